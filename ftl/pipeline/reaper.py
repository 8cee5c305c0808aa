"""Kills a local Ray runtime once the driver that started it is gone (ray_session.leave starts it).

Run as a script, `python -I -S reaper.py <driver pid> <pid>:<start time> ...`: stdlib only, so it starts
in milliseconds without the package. A pid is killed only if it still names the same process (its
start time), never a later one that reused the number.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def start_time(pid: int | str) -> str | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def reap(driver: int, doomed: list[str]) -> None:
    while os.getppid() == driver:  # reparented once the driver has exited
        time.sleep(0.005)
    for item in doomed:
        pid, start = item.split(":")
        if start_time(pid) == start:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:  # gone in between
                pass


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2:])
