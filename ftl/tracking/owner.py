"""Who runs an MLflow run, so that a run whose driver died (killed, or cut off from MLflow when it
failed) is ended as FAILED by the next ftl command instead of showing RUNNING forever.

A run is tagged with its driver's host, pid and the pid's start time, and with where that pid
means something: the kernel's boot and the pid namespace (two containers can share a hostname,
and each has its own pid 1). The next command in the same place ends a RUNNING run whose process
is gone (or whose pid now belongs to a younger process). A run from anywhere else is left alone:
from here nobody can tell whether its driver still works.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket

HOST, PID, PID_STARTED, ENDED = "ftl.host", "ftl.pid", "ftl.pid_started", "ftl.ended_because"
PID_SPACE = "ftl.pid_space"


def tags() -> dict[str, str]:
    """This process as a run's owner."""
    return {HOST: socket.gethostname(), PID: str(os.getpid()), PID_STARTED: f"{started(os.getpid()):.2f}",
            PID_SPACE: pid_space()}


@functools.cache
def pid_space() -> str:
    """Where this process's pids are unique: the boot (Linux's boot id) and the pid namespace, hashed."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else open(source).read().strip())
        except OSError:  # not Linux: the hostname is all there is
            parts.append("")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def started(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def gone(run_tags: dict) -> bool:
    """Whether the run's driver has provably stopped: same host, and its process no longer there."""
    import psutil

    if run_tags.get(HOST) != socket.gethostname() or not run_tags.get(PID, "").isdigit():
        return False
    if run_tags.get(PID_SPACE, pid_space()) != pid_space():  # runs tagged before it was recorded: the host decides
        return False  # the same hostname, another container or another boot: its pid is not ours to judge
    try:
        return abs(started(int(run_tags[PID])) - float(run_tags.get(PID_STARTED, 0))) > 0.5
    except psutil.NoSuchProcess:
        return True


def end_abandoned(experiment_id: str) -> list[str]:
    """End the experiment's RUNNING runs whose driver is gone as FAILED; returns their ids."""
    import mlflow

    client, ended = mlflow.MlflowClient(), []
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        if run.data.tags.get(HOST) and gone(run.data.tags):
            client.set_tag(run.info.run_id, ENDED, f"its driver (pid {run.data.tags[PID]} on {run.data.tags[HOST]}) "
                                                   f"stopped without ending it; ended by pid {os.getpid()}")
            client.set_terminated(run.info.run_id, "FAILED")
            ended.append(run.info.run_id)
    return ended
