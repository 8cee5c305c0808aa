"""Errors that pass (timeouts, throttling, 5xx, resets, permissions) against errors that stay.

A transient error is retried a few times with backoff inside the run; if it persists, the image
is left not done, and the next run tries it again. Only a permanent error (not an image, a
truncated file, over a size limit, gone) puts an image in the quarantine.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

from ftl.errors import FtlError, chain

T = TypeVar("T")
# Attempts whose backoff adds up to about 15 s (0.5 + 1 + 2 + 4 + 8, jittered): enough to ride out
# a short storage outage or a restart of the endpoint, not so long that a dead one hangs a task.
OUTAGE_ATTEMPTS = 6

TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EAGAIN,
                    errno.EBUSY, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE,
                    errno.EACCES, errno.EPERM, getattr(errno, "EREMOTEIO", 121)}
# Names of exception classes from botocore, aiohttp, urllib3 and friends, matched by name so
# that this module imports none of them.
TRANSIENT_NAMES = {"ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                   "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                   "ProtocolError", "IncompleteRead", "ResponseStreamingError", "NoCredentialsError",
                   "ServerTimeoutError", "SlowDown", "ThrottlingException", "RequestTimeout"}
# HTTP statuses and S3 error codes that pass: timeouts, throttling, the server's own failures.
TRANSIENT_STATUS = {403, 408, 429, 500, 502, 503, 504}  # 403: a policy being fixed (see PermissionError)
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "RequestTimeTooSkewed",
                   "AccessDenied"}
# Only for errors that carry no type, errno, status or code of their own (deltalake's object
# store reports S3 failures as a bare message), and only after URIs and paths are cut out of it:
# an image named img_503.png or a folder timeouts/ says nothing about the error.
OPAQUE_WORDS = ("timed out", "timeout", "throttl", "slow down", "slowdown", "internal error", "internal server error",
                "bad gateway", "gateway timeout",
                "service unavailable", "connection reset", "connection refused", "connection closed",
                "error sending request", "access denied", "forbidden", "too many requests")
LASTING = (FtlError, FileNotFoundError, IsADirectoryError)  # whatever else the chain holds
PATHS = re.compile(r"\S*[/\\]\S*")


def is_transient(e: BaseException) -> bool:
    """Would the same read succeed later? Judged by the types, errnos, statuses and codes of the error and
    its causes, never by words in a message that may quote a URI."""
    opaque, said = [], False
    for c in chain(e):
        if isinstance(c, LASTING):
            return False  # ours, or the object is gone: nothing a retry changes
        verdict = structured(c)
        if verdict:
            return True
        said |= verdict is False
        if verdict is None:
            opaque.append(c)
    if said:
        return False  # something in the chain said what it is, and it does not pass
    return any(w in PATHS.sub(" ", str(c)).lower() for c in opaque for w in OPAQUE_WORDS)


def structured(e: BaseException) -> bool | None:
    """What the error's own fields say: True (passes), False (stays), or None (it says nothing)."""
    if isinstance(e, (TimeoutError, ConnectionError, PermissionError)) or type(e).__name__ in TRANSIENT_NAMES:
        return True
    response = getattr(e, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code in TRANSIENT_CODES or status in TRANSIENT_STATUS
    status = getattr(e, "status", None) or getattr(e, "status_code", None)  # aiohttp, requests
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    if isinstance(e, OSError) and e.errno is not None:
        # EIO is s3fs's "an S3 error it has no errno for": its cause (the ClientError) says which.
        return None if e.errno == errno.EIO else e.errno in TRANSIENT_ERRNOS
    return None  # a bare OSError (deltalake's object store), a wrapper, a decoder's ValueError


def backoff(attempt: int, *, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before retry `attempt` + 1: exponential, capped, jittered so retries spread out."""
    return min(cap, base * 2**attempt) * (0.5 + random.random())


def with_retries(fn: Callable[[], T], *, attempts: int = 4) -> T:
    """Call `fn`, retrying transient errors with jittered exponential backoff; re-raise the last error."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts - 1 or not is_transient(e):
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")
