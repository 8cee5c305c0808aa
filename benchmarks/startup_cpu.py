"""CPU time each process spends from a command's launch to its first batch: where a start-up's CPU goes.

    python benchmarks/startup_cpu.py -- ftl extract workflow.yaml

On a machine with few cores, what bounds the start-up is the CPU every process of a local Ray
runtime spends, not any one of them. Runs the command with ftl's progress lines on, and at the
first line with images done reads the CPU time (user + system) of every process from /proc;
prints them, largest first, with the total. Linux only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (the benchmarks' process naming)

FIRST = re.compile(r"^(?:extract|predict): [1-9][\d,]*(?:/[\d,]+)? images")


def cpu_seconds() -> dict[int, float]:
    """pid → CPU seconds (user + system) used so far, for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        except OSError:
            continue
        out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    if "--" not in sys.argv:
        sys.exit(__doc__)
    cmd = sys.argv[sys.argv.index("--") + 1:]
    before = cpu_seconds()
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"FTL_PROGRESS_SECONDS": "0.25", "PYTHONUNBUFFERED": "1"})
    at, used = None, {}
    for line in proc.stdout:
        if at is None and FIRST.match(line):
            at, now = time.time() - launched, cpu_seconds()
            used = {pid: (cpu - before.get(pid, 0.0), _common.process_name(pid)) for pid, cpu in now.items()}
    proc.wait()
    if at is None:
        sys.exit(f"no progress line with images done came from {cmd} (exit {proc.returncode})")
    rows = sorted(((s, pid, name) for pid, (s, name) in used.items() if s >= 0.05), reverse=True)
    for s, pid, name in rows:
        print(f"{s:6.2f} s  {pid:>7}  {name}")
    print(f"first batch at {at:.2f} s; {sum(r[0] for r in rows):.2f} CPU-seconds spent by then "
          f"on {len(os.sched_getaffinity(0))} cores")


if __name__ == "__main__":
    main()
