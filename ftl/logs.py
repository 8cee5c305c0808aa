"""Quiet by default: only ftl's own lines, its progress and every error reach the screen.

Ray's start-up lines, Ray Data's per-dataset INFO lines, Ray Train's controller chatter and
MLflow's notices tell a user nothing they can act on; `-v`/`--verbose` (or FTL_VERBOSE=1, which
a Ray job's driver inherits) shows them all. Warnings and errors always pass: a level of WARNING
hides INFO only.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import warnings

VERBOSE_ENV = "FTL_VERBOSE"
CHATTY = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "filelock")
# Lines Ray's C++ core writes straight to the process's stderr that say nothing a user can act on.
# Ray Data hands every actor of a pool its constructor arguments through the object store and
# restarts actors on failure: Ray warns of that combination (ray-project/ray#53727) at ERROR
# level, once per actor pool, on every run. Matched whole, so that no other error is ever dropped.
NATIVE_NOISE = (r"^\[[^\]]+\] core_worker\.cc:\d+: Actor with class name: '[^']+' and ID: '[0-9a-f]+' has "
                r"constructor arguments in the object store and max_restarts > 0\. If the arguments in the object "
                r"store go out of scope or are lost, the actor restart will fail\. See "
                r"https://github\.com/ray-project/ray/issues/53727 for more details\.\s*$")
# Runs in its own process, so that it outlives a crash of ours and still passes on every last line.
FILTER = """
import os, re, sys
drop = re.compile(sys.argv[1].encode())
for line in sys.stdin.buffer:
    if not drop.match(line):
        os.write(1, line)
"""


def say(text: str) -> None:
    """A line for the user before or between the work (stderr, beside the progress lines); the summary is stdout."""
    print(text, file=sys.stderr, flush=True)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(*, be_verbose: bool) -> None:
    """Set the levels once, at the start of a command; workers read FTL_VERBOSE."""
    if be_verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow sets its own loggers' level when it is imported, from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Its "View run … at" lines: each summary ends with the run's link already.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # s3fs's and aiohttp's own background tasks fail with the network during an outage, and asyncio
    # prints each one's traceback; the read that needed it is retried, and counted, by ftl.
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _PassingTaskErrors) for f in asyncio_log.filters):
        asyncio_log.addFilter(_PassingTaskErrors())
    # Deprecations inside Ray and MLflow are theirs to fix, not the user's; ours are fixed where they arise.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(ray|mlflow|pydantic)(\.|$)")


def ray_logging_level() -> str:
    return "info" if verbose() else "warning"


class _Drop(logging.Filter):
    """Drops the records that say only what ftl itself chose: its progress line replaces Ray's bars, and its
    training workers take every CPU of a small node on purpose while Ray Data reads arrays that are already
    in the object store (Ray Data warns of a hang from one look at the free CPUs, and none follows).
    A write task refused by a newer run's fence is reported by ftl in one line: Ray's traceback of it goes."""

    CHOSEN = ("Progress bars disabled", "tqdm is not installed. Progress bars will be disabled",
              "The Ray cluster currently does not have any available CPUs. The Dataset job will hang")

    def filter(self, record: logging.LogRecord) -> bool:
        from ftl.io.lease import LeaseLost

        if record.exc_info and isinstance(record.exc_info[1], LeaseLost):
            return False
        return not any(text in record.getMessage() for text in self.CHOSEN)


class _PassingTaskErrors(logging.Filter):
    """asyncio's 'Task exception was never retrieved' for an error that passes (a reset, a timeout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ftl.io import retry

        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and "never retrieved" in record.getMessage() and retry.is_transient(error))


def quiet_ray_data() -> None:
    """Ray and Ray Data configure their own console handlers (INFO) when imported: raise them to WARNING.

    Their file logs under the Ray session keep everything, for whoever looks.
    """
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers + logging.getLogger("ray").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _Drop) for f in handler.filters):
                handler.addFilter(_Drop())


def own_progress(context=None) -> None:
    """No Ray Data bars or INFO lines for a dataset (its context), or for every dataset of a Ray Train worker.

    ftl's own progress line (ftl.pipeline.progress) replaces them; a worker's would also reach the
    driver's terminal through Ray's log forwarding, drawn into the middle of that line.
    """
    import ray.data

    (context or ray.data.DataContext.get_current()).enable_progress_bars = verbose()
    quiet_ray_data()


def own_process(argv: list[str]) -> None:
    """Settings for a process that started as `ftl`, made before Ray is imported."""
    if not os.environ.get("RAY_ADDRESS"):
        # Ray turns token auth on for the local cluster it starts anyway, and warns that it did unless
        # the mode is set. Set, it warns no more; it is read once, when ray is imported.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    filter_native_stderr(argv)


def filter_native_stderr(argv: list[str]) -> None:
    """In the `ftl` process, pass what native code writes to stderr through FILTER, which drops NATIVE_NOISE only.

    Python's own writes (ftl's lines, progress, tracebacks) go to the real stderr directly, so a
    terminal stays a terminal. Not under -v, and never in a process that did not start as `ftl`.
    """
    if verbose() or {"-v", "--verbose"} & set(argv):
        return
    try:
        real = os.dup(2)
        sys.stderr.flush()
        pump = subprocess.Popen([sys.executable, "-c", FILTER, NATIVE_NOISE], stdin=subprocess.PIPE, stdout=real,
                                stderr=real, close_fds=True)
        os.dup2(pump.stdin.fileno(), 2)
        pump.stdin.close()  # fd 2 is now its only writer here: its end of file is our exit (or Ray's children's)
    except OSError:  # no filter, then: every line shows, none is lost
        return
    sys.stderr = open(os.dup(real), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",  # noqa: SIM115
                      errors="backslashreplace")

    def drain() -> None:
        # Last at exit (registered before Ray's own handlers): after Ray's shutdown, give the filter its end of file.
        sys.stderr.flush()
        os.dup2(real, 2)
        try:
            pump.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a child still holds the pipe; it passes the rest on when it ends
            pass

    _finishers.append(drain)
    atexit.register(finish)


_finishers: list = []


def finish() -> None:
    """Hand the native stderr filter its end of file and wait for its last lines; at exit, or before os._exit."""
    while _finishers:
        _finishers.pop()()
