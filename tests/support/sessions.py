"""The processes of one session: a node as `ray start` began it, or a server, stopped without touching
anything else on the machine."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def end_session(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal every process of `proc`'s session (SIGKILL after 10 s); nothing else is touched."""
    procs = session_processes(proc.pid)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes of session `sid` (a node, as `ray start` began it)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except OSError:
            pass
    return out


def session_members(sid: int) -> list[int]:
    return [p.pid for p in session_processes(sid)]


def running(proc: psutil.Process) -> bool:
    """Still running: not gone, and not a zombie that init has yet to reap (a killed process may wait a moment)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
