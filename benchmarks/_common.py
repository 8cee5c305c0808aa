"""Helpers for benchmarks/extract.py: cached JPEG data, process-tree memory, the plain PyTorch loop."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ftl import datasets
from ftl.model import imaging

CACHE = Path(__file__).resolve().parent / ".cache"
PAGE = os.sysconf("SC_PAGE_SIZE")


def jpeg_folder(n: int, width: int) -> Path:
    """An imagefolder of at least `n` Fashion-MNIST JPEGs, `width` x 3/4 width, reused across runs."""
    per_class = math.ceil(n / 15)  # write_imagefolder writes train + val/4 + test/4 per class, rounded down
    while 10 * (per_class + 2 * (per_class // 4)) < n:
        per_class += 1
    done = sorted(CACHE.glob(f"fmnist-w{width}-pc*/.complete"), key=lambda p: int(p.parent.name.rsplit("pc", 1)[1]))
    for marker in done:
        if int(marker.parent.name.rsplit("pc", 1)[1]) >= per_class:
            return marker.parent
    root = CACHE / f"fmnist-w{width}-pc{per_class}"
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    count = datasets.write_imagefolder(root, per_class=per_class, fmt="jpg", size=width)
    (root / ".complete").write_text(str(count))
    print(f"wrote {count} JPEGs to {root} in {time.perf_counter() - t:.0f}s (cached for reruns)")
    return root


def list_jpegs(root: Path, n: int) -> list[str]:
    """The `n` image paths ftl's listing takes for `source.limit: n`, so every loop sees the same files."""
    from ftl.config import SourceConfig
    from ftl.sources import listing

    return listing.list_images(SourceConfig(uri=str(root), limit=n))["uri"].to_pylist()


class MemorySampler:
    """Peak RSS and PSS summed over this process and all its descendants (local Ray workers included)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.at_peak: list[tuple[str, int, int]] = []  # (process, RSS, PSS) when PSS peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "MemorySampler":
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
        procs = [(pid, *memory_of(pid)) for pid in tree(os.getpid())]
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


def load_pil(path: str, pre: imaging.Preprocess) -> tuple[np.ndarray, int, int]:
    """What a careful hand-written loader does: PIL decode (JPEG draft), shorter side to resize, centre crop."""
    img = Image.open(path)
    width, height = img.size
    scale = pre.resize / min(width, height)
    img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    img = img.convert("RGB")
    w, h = img.size
    scale = pre.resize / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    left, top = (img.width - pre.crop) // 2, (img.height - pre.crop) // 2
    img = img.crop((left, top, left + pre.crop, top + pre.crop))
    return np.array(img, dtype=np.uint8), width, height  # a writable copy, as torch.from_numpy wants


class JpegFiles(torch.utils.data.Dataset):
    """Image files of an imagefolder → (uint8 HWC pixels, width, height, index)."""

    def __init__(self, paths: list[str], pre: imaging.Preprocess):
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        pixels, w, h = load_pil(self.paths[i], self.pre)
        return torch.from_numpy(pixels), w, h, i


def one_thread(_worker: int) -> None:
    # Loader workers only decode; torch threads there would fight the model for the cores.
    torch.set_num_threads(1)


def rows_table(paths: list[str], idx: list[int], widths, heights, feats: dict[str, np.ndarray],
               prov: dict, schema: pa.Schema) -> pa.Table:
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
    for layer in prov["layers"]:
        values = feats[layer["name"]].astype(np.float32, copy=False).reshape(-1)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values), layer["dim"]))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_rows(writer: pq.ParquetWriter | None, table: pa.Table, path: Path) -> pq.ParquetWriter:
    writer = writer or pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
    return writer


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
