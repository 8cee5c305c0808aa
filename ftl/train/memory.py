"""What a training worker needs in memory for its split, against what Ray lets one worker use.

A worker holds its shard of train (1/workers of it) and all of val as float32 tensors when they
fit, so an epoch is a pass over memory. AdamW can instead stream its shard through Ray Data in
batches each epoch, needing a few batches only. L-BFGS cannot: it is full-batch, every
line-search step is a pass over the whole split. So an L-BFGS fit whose shard does not fit stops
before it starts, with the numbers and what to use instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Self

from ftl.config import TrainConfig
from ftl.errors import TrainError

FLOAT = 4  # bytes per float32
GIB = 1 << 30
WORKER_BASE = 600 << 20  # a worker's private memory before any data: Python, torch, Ray (0.45 GiB measured) + slack
BLOCK_BYTES = 64 << 20  # the largest Ray Data block of features (fit.to_dataset cuts them so)
BLOCKS_IN_FLIGHT = 4  # blocks a reading worker may hold at once: the one read, prefetched ones
READ_ROWS = 8192  # rows per batch when a worker reads its shard into memory
CHUNK_ROWS = 16384  # rows per forward/backward in L-BFGS's full-batch closure and in validation
KILL_THRESHOLD = 0.95  # Ray's default RAY_memory_usage_threshold: the node's share of memory at which it kills workers
LBFGS_HISTORY = 20  # correction pairs L-BFGS keeps, each two vectors of every parameter


ALWAYS_HELD = 256 * 2**20  # bytes of train + val per worker that are held, never refused


@dataclass(frozen=True)
class Need:
    """Bytes one worker needs: its share of train held, val held, and the working memory of the fit."""

    train: int
    val: int
    work: int

    @property
    def held(self) -> int:
        return WORKER_BASE + self.train + self.val + self.work

    @property
    def streamed(self) -> int:
        return WORKER_BASE + BLOCKS_IN_FLIGHT * BLOCK_BYTES + self.val + self.work


def need(*, optimizer: str, rows: int, val_rows: int, dim: int, classes: int, hidden: list[int],
         workers: int, batch_size: int) -> Need:
    """The estimate, from rows × dims × 4 bytes and the widths of the head."""
    widths = [*hidden, classes]
    params = sum(a * b + b for a, b in zip([dim, *hidden], widths))
    # Per row of a forward and backward: the standardised input, then each layer's output, its
    # activation and its gradient (3 copies); cross-entropy adds the log-softmax.
    per_row = FLOAT * (2 * dim + 3 * sum(widths) + classes)
    if optimizer == "lbfgs":
        work = CHUNK_ROWS * per_row + FLOAT * params * (2 * LBFGS_HISTORY + 6)  # chunk; history, grads, line search
    else:
        work = max(1, batch_size // workers) * per_row + FLOAT * params * 4  # batch; weights, grads, 2 moments
    work += CHUNK_ROWS * FLOAT * 2 * classes  # validation logits, one chunk at a time
    work += 2 * READ_ROWS * dim * FLOAT  # reading a shard: the batch in hand and the one prefetched
    return Need(train=math.ceil(rows / workers) * dim * FLOAT, val=val_rows * dim * FLOAT, work=work)


def budget(workers: int, *, staged: int = 0) -> tuple[int, str]:
    """Bytes one Ray Train worker may use, and where that number comes from (`staged`: bound for the object store)."""
    import psutil

    from ftl.pipeline import ray_session

    if not ray_session.started():  # no runtime needed so far: the fit would run here, in this process
        mem = psutil.virtual_memory()
        return int(mem.available / workers), f"this machine has {gib(mem.available)} GiB available, " \
                                              f"shared by {workers} worker(s)"
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    memory = [n["Resources"].get("memory", 0) for n in nodes]
    largest, total = max(memory, default=0), sum(memory)
    # Workers share the nodes: each gets its part of the cluster's memory, and never more than a node has.
    per_worker = int(min(largest, total / workers))
    source = (f"Ray's memory resource: {gib(total)} GiB over {len(nodes)} node(s), the largest {gib(largest)} GiB, "
              f"shared by {workers} worker(s)")
    if len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == ray.util.get_node_ip_address():
        # One machine, this one: the driver's copy of the features and the object store's copy of them
        # (up to its size; past that it spills to disk) take from the same memory as the workers.
        stored = min(staged, int(nodes[0]["Resources"].get("object_store_memory", 0)))
        mem = psutil.virtual_memory()
        # Ray's memory monitor kills workers once the node's use passes its threshold, not at 100%.
        threshold = float(os.environ.get("RAY_memory_usage_threshold", KILL_THRESHOLD))
        free = mem.available - (1 - threshold) * mem.total - stored
        if free / workers < per_worker:
            per_worker = max(0, int(free / workers))
            source = (f"this machine has {gib(mem.available)} GiB available; less what Ray's memory monitor keeps "
                      f"free ({1 - threshold:.0%}) and the {gib(stored)} GiB the features will take in Ray's "
                      f"object store, that is {gib(free)} GiB, shared by {workers} worker(s)")
    return per_worker, source


def decide(cfg: TrainConfig, *, rows: int, val_rows: int, dim: int, classes: int) -> tuple[bool, Need, int]:
    """Whether the train shard streams through Ray Data (AdamW past the budget); raises if L-BFGS cannot fit."""
    optimizer, workers = cfg.optimizer, cfg.workers
    n = need(optimizer=optimizer, rows=rows, val_rows=val_rows, dim=dim, classes=classes,
             hidden=cfg.hidden if cfg.head == "mlp" else [], workers=workers, batch_size=cfg.batch_size)
    available, source = budget(workers, staged=(rows + val_rows) * dim * FLOAT)
    # Features this small fit whatever the moment's free memory says: refusing them would only
    # turn a busy machine into a failed run (the fixed process cost is paid either way).
    if n.held <= available or n.train + n.val <= ALWAYS_HELD:
        return False, n, available
    if optimizer == "lbfgs":
        shard = math.ceil(rows / workers)
        raise TrainError(
            f"train.optimizer=lbfgs is full-batch: each of {workers} worker(s) must hold its {shard:,} train rows "
            f"× {dim:,} dims × 4 bytes = {gib(n.train)} GiB, plus val {gib(n.val)} GiB and {gib(n.work)} GiB to "
            f"work in and {gib(WORKER_BASE)} GiB of process: about {gib(n.held)} GiB per worker, but a worker may "
            f"use {gib(available)} GiB ({source}). Use train.optimizer=adamw, which streams train through Ray Data "
            f"in batches (about {gib(n.streamed)} GiB per worker), or spread train over nodes with more memory "
            f"(train.workers=N holds 1/N of it per worker)"
        )
    if n.streamed > available:
        raise TrainError(
            f"even streaming train, a worker needs about {gib(n.streamed)} GiB (val {gib(n.val)} GiB held whole, "
            f"{gib(n.work)} GiB to work in) but may use {gib(available)} GiB ({source}); use a smaller val split "
            f"(train.val_fraction), a smaller train.batch_size, or nodes with more memory"
        )
    return True, n, available


class Peak:
    """Samples this process's private resident memory (RssAnon: not shared libraries, not the object store's
    pages a reader maps) in a thread, and keeps its peak; the kernel keeps a peak of total RSS only."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.private = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.private = max(self.private, private_bytes())
            if self._stop.wait(self.interval):
                return

    @property
    def rss(self) -> int:
        """Peak resident memory, shared pages included (Linux reports KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def private_bytes() -> int:
    """RssAnon of this process, 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"
