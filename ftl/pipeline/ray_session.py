"""The Ray runtime a command joins or starts: started early, in the background, and left quickly.

A local runtime costs a few CPU-seconds to start (GCS, raylet, agents, prestarted workers) and
used to be started only once the driver had imported torch and planned. `start_early` starts it
on a thread as soon as the command is known, so the two overlap; `ensure_ray` waits for it.

On a machine of its own the runtime hands its workers their settings (allocator.WORKER_ENV) through
their inherited environment rather than each actor's `runtime_env`: an actor whose environment
matches the job's takes one of the workers Ray prestarted, instead of waiting for a new process.

`leave` ends a local runtime this process started without Ray's graceful shutdown, which waits
up to a second per process and half a second more at interpreter exit; everything a command
writes is committed before it returns, so there is nothing left for those waits to protect.
The runtime is killed only once the driver has exited, by a small reaper process: killed while
the driver lives, its gRPC threads may see their peers vanish mid-call and abort the driver.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from ftl import logs
from ftl.errors import FtlError
from ftl.pipeline import reaper
from ftl.pipeline.allocator import WORKER_ENV

_lock = threading.Lock()
_thread: threading.Thread | None = None
_ready = threading.Event()  # set once the thread's start has succeeded or failed
_failure: BaseException | None = None
_started_local = False  # this process began a local runtime's start (set before ray.init: it may not have finished)
_before: set[int] = set()  # this process's children before Ray started (the stderr filter)


class _NotMainThread(logging.Filter):
    """ray.init warns that it set no SIGTERM handler off the main thread; `start_early` sets Ray's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def local() -> bool:
    """Whether this command runs on a runtime of its own rather than a cluster's (RAY_ADDRESS)."""
    return not os.environ.get("RAY_ADDRESS")


def started() -> bool:
    """Whether this process is connected to a Ray runtime (without importing Ray to ask)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def this_machine_only() -> bool:
    """Whether Ray's work would run on this machine alone: no runtime yet and no cluster to join, or a
    runtime of one node, this one. Work sent to a Ray task there buys no placement and no retry."""
    if not started():
        return local()
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == ray.util.get_node_ip_address()


def inherits_worker_env() -> bool:
    """Whether workers already start with WORKER_ENV: a local runtime this process started (`_start` sets it)."""
    return _started_local


def start_early() -> None:
    """Start (or join) the runtime on a thread now; `ensure_ray` waits for it. Call from the main thread."""
    global _thread
    import ray  # here, so that the thread never races the main thread's first import of ray

    with _lock:
        if _thread is not None or ray.is_initialized():
            return
        # What ray.init does on the main thread: a SIGTERM (`ray job stop`) ends the driver.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        logging.getLogger("ray._private.worker").addFilter(_NotMainThread())
        _thread = threading.Thread(target=_start_recording, name="ftl-ray-start", daemon=True)
        _thread.start()


def ensure_ray() -> None:
    """Join the running cluster (RAY_ADDRESS, as `ray job submit` sets) or start a local one."""
    import ray

    try:
        if _thread is not None:
            _ready.wait()
            if _failure is not None:
                raise _failure
        if not ray.is_initialized():  # never started, or shut down since (a test's own runtime)
            _start()
    except FtlError:
        raise
    except Exception as e:
        raise not_started(e) from e
    logs.quiet_ray_data()


def not_started(e: Exception) -> FtlError:
    """Ray's own start-up failure, said with what to do about it."""
    said = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if not local():
        return FtlError(f"could not join the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']} ({said}); check "
                        f"that its head runs (`ray status --address ...`), or unset RAY_ADDRESS to run locally")
    return FtlError(f"the local Ray runtime did not start ({said}). On a loaded or small machine its processes can "
                    f"take longer than Ray waits: retry when the machine is quieter, free memory and /dev/shm, or "
                    f"start one yourself (`ray start --head`) and set RAY_ADDRESS=auto")


def _start_recording() -> None:
    global _failure
    try:
        _start()
    except BaseException as e:  # handed to the main thread by ensure_ray
        _failure = e
    finally:
        _ready.set()
    # Ray binds its processes' lives to the thread that started them (PR_SET_PDEATHSIG names a
    # thread, not a process): this thread ending would take the GCS and the raylet with it.
    threading.Event().wait()


def _start() -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers' own lines (Ray Train's controller, Ray Data's coordinators) only under -v; the session's
    # log folder keeps them, and a worker's error still reaches the driver as the exception it raises.
    shown = logs.verbose()
    if not local():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=shown)
        return
    global _started_local
    _before.update(_children(os.getpid()))
    _started_local = True
    # Inherited by every process of the runtime; set before any starts (see module docstring).
    os.environ.update(WORKER_ENV)
    # A local runtime for one command needs no dashboard; it only slows the start.
    ray.init(include_dashboard=False, configure_logging=True, logging_level=logs.ray_logging_level(),
             log_to_driver=shown)


def leave() -> bool:
    """Before exit: have the local runtime this process started killed as soon as this process is gone.

    Returns False (nothing done) for a cluster's runtime or none. A command that failed before it
    needed Ray first waits for the start it began: exiting mid-`ray.init` leaves half a runtime
    and Ray's errors about it. The caller must then exit with os._exit, at once (cli.finish_fast).
    """
    if _thread is not None and not _ready.wait(timeout=_START_WAIT_S):
        logging.getLogger(__name__).warning("the Ray runtime did not finish starting in %ss; leaving it", _START_WAIT_S)
    if not _started_local:
        return False
    roots = [pid for pid in _children(os.getpid()) if pid not in _before]
    doomed = [f"{pid}:{start}" for root in roots for pid in _tree(root) if (start := reaper.start_time(pid))]
    import subprocess

    # In this process's session, so whoever watches it sees the reaper end too; it holds none of our
    # pipes, so a caller reading our output to its end is not kept waiting for it.
    subprocess.Popen([sys.executable, "-I", "-S", reaper.__file__, str(os.getpid()), *doomed], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    return True


_START_WAIT_S = 60


def _children(pid: int) -> list[int]:
    """Children of every thread of `pid` (Linux lists a child under the thread that started it)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # not Linux, or gone: leave() then does nothing and Ray's own shutdown runs at exit
        pass
    return out


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out
