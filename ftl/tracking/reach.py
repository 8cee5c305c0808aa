"""Before a command talks to an MLflow server: is anything there? Said on the screen while it waits.

MLflow's client retries a refused connection for minutes with nothing on the screen. A server
that refuses, times out or has no DNS name is asked again here for a bounded time, each try said
on stderr, and then the command stops with what to fix. Any HTTP answer (even 401 or 404) means
a server is there, and what it says is MLflow's to handle; so is a TLS error.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request

from ftl.errors import TrackingError

WAIT_ENV = "FTL_MLFLOW_WAIT_SECONDS"
DEFAULT_WAIT = 30.0  # a server being restarted is back within this; a wrong URI is said soon enough


def wait_for(uri: str, *, seconds: float | None = None) -> None:
    """Return once a server answers at `uri` (http or https); raise TrackingError after `seconds`."""
    if not uri.startswith(("http://", "https://")):
        return
    seconds = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT)) if seconds is None else seconds
    deadline, attempt = time.monotonic() + seconds, 0
    while True:
        why = unanswered(f"{uri.rstrip('/')}/health")
        if why is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrackingError(f"MLflow at {uri} did not answer for {seconds:.0f}s ({why}); start the server, or "
                                f"point tracking.uri (or MLFLOW_TRACKING_URI) at one that runs")
        pause = min(2.0**attempt, 5.0, left)
        print(f"MLflow at {uri}: {why}; trying again in {pause:.0f}s ({left:.0f}s left)", file=sys.stderr,
              flush=True)
        time.sleep(pause)
        attempt += 1


def unanswered(url: str) -> str | None:
    """Why nothing answered at `url`, or None if something did."""
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError:
        return None  # an HTTP status is an answer
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror)):
            return f"{type(reason).__name__}: {reason}"
        return None  # TLS and the like: MLflow's client, with its own settings, says what is wrong
    except (ConnectionError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"
    return None
