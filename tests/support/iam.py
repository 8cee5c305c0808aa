"""Every S3 request a node makes, recorded by the S3 server, and judged against that node's IAM policy.

`S3Front` serves the test session's S3 state (moto keeps it per process) on a port of its own and
records each request that reaches it, with the node that made it: each node signs its requests for
a region of its own (AWS_DEFAULT_REGION in its environment), which the request's credential scope
names. (The endpoint cannot tell them apart: a filesystem the driver opened travels to the write
tasks with the driver's endpoint in it.)
`checks` turns a request into what AWS would authorise (an action, a resource ARN, the
condition keys it carries), and `allowed` evaluates an IAM policy document the way AWS does
for one principal: an explicit Deny wins, else some Allow must match.
"""

from __future__ import annotations

import fnmatch
import io
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

LIST_QUERY = {"list-type", "prefix", "delimiter", "max-keys", "encoding-type", "continuation-token", "start-after",
              "fetch-owner", "marker"}


@dataclass(frozen=True)
class Request:
    role: str
    method: str
    path: str
    query: str
    headers: tuple = ()
    deleted: tuple[str, ...] = field(default=())  # the keys of a multi-object delete


class S3Front:
    """moto's S3 app on its own port, recording each request under the role its signing region names."""

    def __init__(self, roles: dict[str, str], log: list[Request]):
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.roles, self.log = roles, log
        self.app = DomainDispatcherApplication(create_backend_app)
        self.server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __call__(self, environ, start_response):
        query = environ.get("QUERY_STRING", "")
        deleted = ()
        if environ["REQUEST_METHOD"] == "POST" and "delete" in parse_qs(query, keep_blank_values=True):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            deleted = tuple(e.text for e in ET.fromstring(body).iter() if e.tag.endswith("Key"))
        headers = tuple((k, environ[k]) for k in ("HTTP_IF_NONE_MATCH", "HTTP_IF_MATCH", "HTTP_X_AMZ_COPY_SOURCE")
                        if k in environ)
        scope = re.search(r"Credential=[^/]+/\d+/([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        role = self.roles.get(scope.group(1) if scope else "", f"unknown ({scope and scope.group(1)})")
        self.log.append(Request(role, environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", "")), query,
                                headers, deleted))
        return self.app(environ, start_response)

    def stop(self) -> None:
        self.server.shutdown()


def checks(r: Request) -> list[list[tuple[str, str, dict]]]:
    """What AWS checks for this request: each entry must pass through one of its alternatives."""
    bucket, _, key = r.path.lstrip("/").partition("/")
    q = parse_qs(r.query, keep_blank_values=True)
    if not key and r.method == "HEAD":
        # s3fs asks whether a bucket exists (before any "mkdir") with HeadBucket, which needs
        # ListBucket on the whole bucket, and on a refusal with GetBucketLocation.
        return [[("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": None}),
                 ("s3:GetBucketLocation", f"arn:aws:s3:::{bucket}", {})]]
    return [[check] for check in single(r, bucket, key, q)]


def single(r: Request, bucket: str, key: str, q: dict) -> list[tuple[str, str, dict]]:
    """(IAM action, resource ARN, condition keys) for a request AWS authorises one way."""
    headers = dict(r.headers)
    if not key:
        if r.method == "GET" and set(q) <= LIST_QUERY:  # ListObjects(V2)
            return [("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": q.get("prefix", [None])[0]})]
        if r.method == "POST" and "delete" in q:
            return [("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{k}", {}) for k in r.deleted]
        raise AssertionError(f"a bucket request this test cannot judge: {r}")
    arn = f"arn:aws:s3:::{bucket}/{key}"
    if r.method in ("GET", "HEAD"):
        return [("s3:ListMultipartUploadParts" if "uploadId" in q else "s3:GetObject", arn, {})]
    if r.method == "PUT" or (r.method == "POST" and ("uploads" in q or "uploadId" in q)):
        conditions = {"s3:if-none-match": headers.get("HTTP_IF_NONE_MATCH"),
                      "s3:if-match": headers.get("HTTP_IF_MATCH")}
        out = [("s3:PutObject", arn, conditions)]
        if "HTTP_X_AMZ_COPY_SOURCE" in headers:  # CopyObject reads its source
            out.append(("s3:GetObject", f"arn:aws:s3:::{unquote(headers['HTTP_X_AMZ_COPY_SOURCE']).lstrip('/')}", {}))
        return out
    if r.method == "DELETE":
        return [("s3:AbortMultipartUpload" if "uploadId" in q else "s3:DeleteObject", arn, {})]
    raise AssertionError(f"an object request this test cannot judge: {r}")


def matches(patterns, value: str, *, case: bool = True) -> bool:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not case:
        return any(fnmatch.fnmatchcase(value.lower(), p.lower()) for p in patterns)
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def conditions_hold(conditions: dict | None, context: dict) -> bool:
    for operator, tests in (conditions or {}).items():
        for key, expected in tests.items():
            expected = [expected] if isinstance(expected, str) else expected
            value = context.get(key)
            if operator == "Null":
                if (value is None) != (expected[0] == "true"):
                    return False
            elif operator in ("StringLike", "StringEquals"):
                if value is None or not (matches(expected, value) if operator == "StringLike" else value in expected):
                    return False
            else:
                raise AssertionError(f"condition operator {operator} not judged by this test")
    return True


def allowed(policy: dict, action: str, resource: str, context: dict) -> bool:
    """AWS's evaluation for one identity policy: an explicit Deny wins; otherwise an Allow must match."""
    allow = False
    for st in policy["Statement"]:
        if not (matches(st["Action"], action, case=False) and matches(st["Resource"], resource)
                and conditions_hold(st.get("Condition"), context)):
            continue
        if st["Effect"] == "Deny":
            return False
        allow = True
    return allow
