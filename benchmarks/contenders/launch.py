"""Run one contender as its own process and time it as a user waits: from launch to exit.

Two sources of marks inside a run: a contender script's `BENCH {json}` line (ceiling, loop), or
ftl's own progress lines, which the CLI prints to stderr every FTL_PROGRESS_SECONDS when stderr
is not a terminal; each is stamped here as it arrives. From either come the time to the first
batch (the start-up a user waits through) and the streaming rate between the first and the
last batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common

PROGRESS = re.compile(r"^(?:extract|predict): ([\d,]+)(?:/[\d,]+)? images")
PROGRESS_SECONDS = "0.25"  # how often ftl prints its progress line here: the resolution of its marks


def run(cmd: list[str], *, env: dict, images: int, log: Path, memory: bool = False) -> dict:
    """Start `cmd`, collect its marks, and with `memory` sample its process tree's memory; raises with its log if it fails.

    Sampling reads every process's smaps_rollup: about 60 ms of CPU per sample for ftl's 15
    processes and a few for a single process, so it would tax the contender with the most
    processes. Timed runs are therefore unsampled and memory has runs of its own.
    """
    env = env | {"FTL_PROGRESS_SECONDS": PROGRESS_SECONDS, "PYTHONUNBUFFERED": "1"}
    seen: list[tuple[float, int]] = []  # (time, images done) from ftl's progress lines
    lines: list[str] = []
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with (_common.MemorySampler(interval=0.5, root=proc.pid) if memory else contextlib.nullcontext()) as mem:
        reader = threading.Thread(target=collect, args=(proc.stdout, lines, seen), daemon=True)
        reader.start()
        code = proc.wait()
        ended = time.time()
        reader.join()
    log.write_text("".join(lines))
    if code:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}; its output ({log}) ends with:\n{tail}")
    bench = next((json.loads(line[6:]) for line in reversed(lines) if line.startswith("BENCH ")), None)
    marks = bench or from_progress(seen, images)
    out = summarise(marks, launched=launched, ended=ended, images=images)
    return out | ({"peak_pss": mem.peak_pss, "peak_rss": mem.peak_rss} if memory else {})


def collect(stream, lines: list[str], seen: list[tuple[float, int]]) -> None:
    for line in stream:
        lines.append(line)
        m = PROGRESS.match(line)
        if m:
            seen.append((time.time(), int(m.group(1).replace(",", ""))))


def from_progress(seen: list[tuple[float, int]], images: int) -> dict:
    """The first and the last batch from ftl's progress lines: the first line with images done, the first with all."""
    started = [(t, n) for t, n in seen if n > 0]
    if len(started) < 2:
        return {}  # too short a run to tell a streaming rate from its start-up
    first, first_n = started[0]
    last, last_n = next(((t, n) for t, n in started if n >= images), started[-1])
    return {"first": first, "first_images": first_n, "last": last, "last_images": last_n}


def summarise(marks: dict, *, launched: float, ended: float, images: int) -> dict:
    wall = ended - launched
    out = {"wall_s": wall, "wall_rate": images / wall}
    done = marks.get("last_images", images) - marks.get("first_images", images)
    if marks.get("first") and marks.get("last") and marks["last"] > marks["first"] and done > 0:
        out |= {"first_batch_s": marks["first"] - launched, "stream_rate": done / (marks["last"] - marks["first"])}
    if marks.get("loaded"):
        out["model_loaded_s"] = marks["loaded"] - launched
    if marks.get("started"):
        out["python_start_s"] = marks["started"] - launched
    return out


def base_env() -> dict:
    """This environment, less what would change how a contender runs (a Ray address, a pinned thread count)."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "MALLOC_CONF"):
        env.pop(key, None)
    return env
