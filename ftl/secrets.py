"""Credentials never leave the process: masking them wherever a workflow, a URL or an error is shown or logged."""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Any

MASK = "***"
# A name is split into words (snake_case, camelCase, kebab-case, dotted) and judged by them, so that
# SecretAccessKey, SSECustomerKey, api_key and X-Amz-Security-Token are caught and label_key is not.
SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "credential", "credentials",
                "apikey", "auth", "authorization", "bearer", "cookie", "signature", "sig"}
# "key" is a secret next to these words; alone it is s3fs's access key.
KEY_WORDS = {"access", "api", "private", "customer", "account", "master", "encryption", "signing", "client"}
URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@]*):(?P<password>[^/\s@]+)@")
# name=value, name: value, 'name': 'value', "name": "value"; never a URL's scheme (https://...)
ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<sep>['\"]?\s*[:=](?!//)\s*['\"]?)"
                        r"(?P<value>[^\s'\",&;})\]]+)")
# ?name=value&name=value in a URL, each parameter on its own (presigned URLs, SAS tokens)
QUERY = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#\s?]+)=(?P<value>[^&#\s'\"]*)")
# Authorization: Bearer <token>, Basic <base64>
SCHEME_TOKEN = re.compile(r"\b(?P<scheme>Bearer|Basic|Token)\s+(?P<value>[A-Za-z0-9._~+/=\-]{8,})")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def words(name: str) -> list[str]:
    parts = re.split(r"[^A-Za-z0-9]+", name)
    return [w.lower() for p in parts for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", p)]


def is_secret(name: str) -> bool:
    """Whether a key of that name holds a credential."""
    ws = words(name)
    if ws == ["key"] or SECRET_WORDS & set(ws):
        return True
    return any(a in KEY_WORDS and b == "key" for a, b in pairwise(ws))


def mask_secrets(data: Any) -> Any:
    """A copy of nested dicts and lists with every credential replaced by ***: values under secret keys,
    and passwords inside strings (URLs with user:password@, name=value pairs)."""
    if isinstance(data, dict):
        return {k: (MASK if is_secret(str(k)) and v not in (None, "", {}, []) else mask_secrets(v))
                for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(mask_secrets(v) for v in data)
    if isinstance(data, str):
        return mask_text(data)
    return data


def mask_text(text: str) -> str:
    """`text` (a URI, an error message, a log line) with the credentials in it replaced by ***."""
    text = URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = QUERY.sub(lambda m: f"{m['lead']}{m['name']}={MASK}" if is_secret(m["name"]) and m["value"] else m[0], text)
    text = SCHEME_TOKEN.sub(lambda m: f"{m['scheme']} {MASK}", text)

    def assignment(m: re.Match) -> str:
        # A bare "key" in prose is more often an object key ("key: images/a.png") than a credential.
        secret = is_secret(m["name"]) and words(m["name"]) != ["key"] and m["value"] != MASK
        return f"{m['name']}{m['sep']}{MASK}" if secret else m[0]

    text = ASSIGNMENT.sub(assignment, text)
    return AWS_KEY_ID.sub(MASK, text)


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """`https://user:password@host/...` → (`https://host/...`, user, password), so that the password can
    travel as a credential (MLFLOW_TRACKING_USERNAME/PASSWORD) and never inside a URI that gets printed."""
    from urllib.parse import unquote

    m = URL_USERINFO.match(uri)
    if not m:
        return uri, None, None
    # Percent-decoded, as in any URL: a password holding ':' or '@' is written %3A, %40.
    return m["scheme"] + uri[m.end():], unquote(m["user"]) or None, unquote(m["password"])
