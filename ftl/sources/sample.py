"""Trial runs on a subset that behaves like the whole: `source.limit` keeps split and class proportions.

Taking the first N images by URI gives a subset of a few classes of one split. Instead, every
(split, label) group gets its share of N (largest remainder, at least one image each while N
allows), and within a group the images with the lowest hash of their URI are taken: the same
listing always gives the same sample, and new images change it only where they land.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def unique_uris(table: pa.Table) -> tuple[pa.Table, int]:
    """One row per URI (the first listed); returns the table and how many duplicate rows were dropped."""
    if pc.count_distinct(table["uri"]).as_py() == table.num_rows:
        return table, 0
    keep = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    first = keep.group_by("uri", use_threads=False).aggregate([("_row", "min")])["_row_min"]
    kept = table.take(pc.take(first, pc.array_sort_indices(first)))  # first rows, in listing order
    return kept, table.num_rows - kept.num_rows


def quotas(sizes: np.ndarray, limit: int) -> np.ndarray:
    """Shares of `limit` proportional to `sizes`, summing to min(limit, total), none over its size;
    while the limit allows, every non-empty group keeps at least one."""
    total = int(sizes.sum())
    if limit >= total:
        return sizes.copy()
    exact = sizes * limit / total
    share = np.floor(exact).astype(np.int64)
    # Largest remainders first, ties to the earlier group, so the sum is exactly `limit`.
    for g in np.argsort(-(exact - share), kind="stable")[: limit - int(share.sum())]:
        share[g] += 1
    if limit >= int((sizes > 0).sum()):
        for g in np.flatnonzero((share == 0) & (sizes > 0)):
            donor = np.argmax(np.where(share > 1, share - exact, -np.inf))  # the group most over its share
            share[donor] -= 1
            share[g] = 1
    return share


def representative(table: pa.Table, limit: int) -> pa.Table:
    """`limit` rows keeping each (split, label) group's share; lowest URI hash first within a group."""
    if limit >= table.num_rows:
        return table
    keys = [f"{s}\0{lab}" for s, lab in zip(table["split"].to_pylist(), table["label"].to_pylist())]
    groups, inverse = np.unique(np.array(keys, dtype=object), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(groups))
    share = quotas(sizes, limit)
    rank = np.array([hashlib.blake2b(u.encode(), digest_size=8).hexdigest() for u in table["uri"].to_pylist()])
    order = np.lexsort((rank, inverse))  # by group, then by hash within it
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    picked = np.flatnonzero(position < share[inverse])
    return table.take(picked)
