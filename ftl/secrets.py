"""Credentials never leave the process: masking them wherever a workflow is shown or logged."""

from __future__ import annotations

from typing import Any

# Storage option names that carry credentials (s3fs/botocore spellings).
SECRET_NAMES = {"key", "secret", "token", "password", "session_token"}
SECRET_SUFFIXES = ("_secret", "_token", "_password", "secret_key", "access_key", "access_key_id")


def is_secret(name: str) -> bool:
    name = name.lower()
    return name in SECRET_NAMES or name.endswith(SECRET_SUFFIXES)


def mask_secrets(data: Any) -> Any:
    """A copy of nested dicts and lists with every credential's value replaced by ***."""
    if isinstance(data, dict):
        return {k: ("***" if is_secret(k) and v else mask_secrets(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_secrets(v) for v in data]
    return data
