"""How a training worker gets its rows: Ray Datasets built from arrays, read whole into tensors or streamed.

Held whole, a worker's shard is one preallocated tensor filled batch by batch, so reading it
costs one copy of the shard and not two (batches, then their concatenation). Streamed, each
epoch reads the shard through Ray Data again, shuffled within a buffer, and a worker holds a
few blocks at a time; the rows are shuffled once when the dataset is built, since an epoch
only mixes what falls into the same buffer.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from ftl.fitting import core
from ftl.train import memory

SHUFFLE_ROWS = 16384  # rows a streamed epoch shuffles among, at least


def to_dataset(x: np.ndarray, y: np.ndarray, *, blocks: int, seed: int | None = None):
    """Arrays → a Ray Dataset of tensor rows in blocks of at most BLOCK_BYTES; rows shuffled once when seeded."""
    import ray
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    # Shuffled once when streamed: an epoch then only shuffles within a buffer, and files are often sorted by class.
    order = np.random.default_rng(seed).permutation(len(y)) if seed is not None else None
    blocks = max(blocks, math.ceil(x.nbytes / memory.BLOCK_BYTES))
    step = max(1, math.ceil(len(y) / blocks))
    refs = []
    for i in range(0, len(y), step):
        rows = order[i : i + step] if order is not None else slice(i, i + step)
        # Into the object store block by block: the driver never holds a second copy of the whole.
        refs.append(ray.put(pa.table({"x": ArrowTensorArray.from_numpy(x[rows]), "y": pa.array(y[rows])})))
    return ray.data.from_arrow_refs(refs)


def shard_tensors(name: str, device: torch.device, *, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's whole shard as two tensors filled in place: one copy, not batches plus their concatenation."""
    import ray.train

    x = y = None
    n = 0
    shard = ray.train.get_dataset_shard(name)
    for batch in shard.iter_torch_batches(batch_size=memory.READ_ROWS, dtypes=None, device="cpu"):
        bx, by = batch["x"], batch["y"]
        if x is None:
            x, y = torch.empty((rows, *bx.shape[1:])), torch.empty(rows, dtype=torch.long)
        if n + len(by) > len(y):  # `rows` was short (it is the equal split's size): grow
            x, y = grow(x, n, 2 * (n + len(by))), grow(y, n, 2 * (n + len(by)))
        x[n : n + len(by)], y[n : n + len(by)] = bx, by
        n += len(by)
    return x[:n].to(device), y[:n].to(device)


def grow(t: torch.Tensor, used: int, size: int) -> torch.Tensor:
    return torch.cat([t[:used], torch.empty((size - used, *t.shape[1:]), dtype=t.dtype)])


def streamed(device: torch.device, *, batch_size: int, seed: int):
    """Epoch → batches of the worker's train shard read through Ray Data, shuffled within a buffer."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")

    def epoch(e: int):
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=None, device=device,
                                              local_shuffle_buffer_size=max(4 * batch_size, SHUFFLE_ROWS),
                                              local_shuffle_seed=seed + e):
            yield batch["x"].float(), batch["y"].long()

    return epoch


def in_memory(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, generator: torch.Generator):
    """Epoch → shuffled minibatches of tensors already held."""

    def epoch(e: int):
        for idx in core.minibatches(len(y), batch_size=batch_size, generator=generator, device=x.device):
            yield x[idx], y[idx]

    return epoch
