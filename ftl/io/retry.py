"""Errors that pass (timeouts, throttling, 5xx, resets, permissions) against errors that stay.

A transient error is retried a few times with backoff inside the run; if it persists, the image
is left not done, and the next run tries it again. Only a permanent error (not an image, a
truncated file, over a size limit, gone) puts an image in the quarantine.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ftl.errors import chain

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
TRANSIENT_WORDS = ("timed out", "timeout", "throttl", "slow down", "slowdown", "503", "500 ", "502", "504",
                   "internal error", "service unavailable", "connection reset", "connection refused",
                   "access denied", "forbidden", "too many requests")


def is_transient(e: BaseException) -> bool:
    """Would the same read succeed later? Walks the exception's causes too."""
    for e in chain(e):
        if isinstance(e, (FileNotFoundError, IsADirectoryError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError, PermissionError)):
            return True
        if type(e).__name__ in TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        if any(w in str(e).lower() for w in TRANSIENT_WORDS):
            return True
    return False


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
