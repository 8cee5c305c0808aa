"""Helpers the benchmarks share: process-tree memory, the Parquet rows a hand-written loop writes, timed spans."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

PAGE = os.sysconf("SC_PAGE_SIZE")


class MemorySampler:
    """Peak RSS and PSS summed over a process (this one by default) and all its descendants (local Ray workers too)."""

    def __init__(self, interval: float = 0.2, *, root: int | None = None):
        self.interval, self.root = interval, root or os.getpid()
        self.peak_rss = self.peak_pss = 0
        self.at_peak: list[tuple[str, int, int]] = []  # (process, RSS, PSS) when PSS peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        procs = [(pid, *memory_of(pid)) for pid in tree(self.root)]
        rss, pss = sum(p[1] for p in procs), sum(p[2] for p in procs)
        if pss > self.peak_pss:
            self.at_peak = [(process_name(pid), r, p) for pid, r, p in procs]
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)


def tree(root: int) -> list[int]:
    """`root` and every descendant, from /proc (a local ray.init starts raylet, which forks the workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name may hold spaces; fields after its closing paren are fixed
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes; PSS splits shared pages (Ray's object store, libraries) among their users."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def process_name(pid: int) -> str:
    """Ray names its workers by role (ray::IDLE, ray::MapWorker(...)), so the command line says what each is."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    if words and words[0].startswith(b"ray::"):
        return words[0].decode()[:60]
    return " ".join(Path(w.decode()).name if i == 0 else w.decode() for i, w in enumerate(words[:3]))[:60]


def image_id(path: str) -> str:
    """Same recipe as ftl's listing: the URI plus size and mtime, hashed."""
    st = os.stat(path)
    return hashlib.blake2b(f"{path}\nsize:{st.st_size}:mtime:{st.st_mtime}".encode(), digest_size=16).hexdigest()


def rows_table(paths: list[str], idx: list[int], widths, heights, feats: dict[str, np.ndarray],
               prov, schema: pa.Schema) -> pa.Table:
    """One batch as the same Arrow table ftl writes: base columns plus a fixed_size_list per layer."""
    sel = [paths[i] for i in idx]
    parts = [Path(p).parts for p in sel]
    arrays = [
        pa.array([image_id(p) for p in sel], pa.string()),
        pa.array(sel, pa.string()),
        pa.array([p[-2] for p in parts], pa.string()),
        pa.array([p[-3] for p in parts], pa.string()),
        pa.array(np.asarray(widths, dtype=np.int32)),
        pa.array(np.asarray(heights, dtype=np.int32)),
    ]
    for layer in prov.layers:  # ftl.io.schema.Provenance
        values = feats[layer.name].astype(np.float32, copy=False).reshape(-1)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values), layer.dim))
    return pa.Table.from_arrays(arrays, schema=schema)


class Spans:
    """Wall time spent inside chosen module functions, by patching them in this process only."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.returned: dict[str, object] = {}

    def wrap(self, module, name: str, label: str) -> None:
        orig = getattr(module, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                self.returned[label] = orig(*args, **kwargs)
                return self.returned[label]
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t

        setattr(module, name, timed)
