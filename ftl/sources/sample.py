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
    groups, inverse = np.unique(group_keys(table), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(groups))
    share = quotas(sizes, limit)
    order = np.lexsort((uri_ranks(table), inverse))  # by group, then by hash within it
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    picked = np.flatnonzero(position < share[inverse])
    return table.take(picked)


# --- the same, as Ray Data operations over a listing that does not fit on one machine -------------

def group_keys(table: pa.Table) -> np.ndarray:
    """Each row's (split, label) group."""
    return np.array([f"{s}\0{lab}" for s, lab in zip(table["split"].to_pylist(), table["label"].to_pylist())],
                    dtype=object)


def uri_ranks(table: pa.Table) -> np.ndarray:
    """Each row's rank within its group: the URI's 64-bit hash."""
    return np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "big")
                     for u in table["uri"].to_pylist()], dtype=np.uint64)


def unique_uris_dataset(ds, *, partitions: int):
    """`unique_uris` over a Ray Dataset with an `_order` column: rows are hash-partitioned by URI, so each
    block holds every row of its URIs and keeps the first (lowest `_order`)."""
    def first(block: pa.Table) -> pa.Table:
        if not block.num_rows or pc.count_distinct(block["uri"]).as_py() == block.num_rows:
            return block
        order = pc.sort_indices(block, sort_keys=[("uri", "ascending"), ("_order", "ascending")])
        block = block.take(order)
        uris = block["uri"].combine_chunks()
        keep = np.ones(len(uris), dtype=bool)
        keep[1:] = pc.not_equal(uris.slice(1), uris.slice(0, len(uris) - 1)).to_numpy(zero_copy_only=False)
        return block.filter(pa.array(keep))

    return ds.repartition(partitions, keys=["uri"]).map_batches(first, batch_size=None, batch_format="pyarrow")


def representative_dataset(ds, limit: int):
    """`representative` over a Ray Dataset, exactly: the group sizes and each block's `limit`-smallest
    ranks per group reach the driver (at most limit × blocks integers), the rows never do."""
    def sizes_and_smallest(block: pa.Table) -> pa.Table:
        keys, ranks = group_keys(block), uri_ranks(block)
        groups, inverse = np.unique(keys, return_inverse=True)
        smallest = [np.sort(ranks[inverse == g])[:limit].tolist() for g in range(len(groups))]
        return pa.table({"group": pa.array(groups.tolist(), pa.string()),
                         "n": pa.array(np.bincount(inverse, minlength=len(groups)), pa.int64()),
                         "ranks": pa.array(smallest, pa.list_(pa.uint64()))})

    parts = ds.map_batches(sizes_and_smallest, batch_size=None, batch_format="pyarrow").take_all()
    names = sorted({p["group"] for p in parts})
    index = {n: i for i, n in enumerate(names)}
    sizes = np.zeros(len(names), dtype=np.int64)
    smallest: list[list[np.ndarray]] = [[] for _ in names]
    for p in parts:
        sizes[index[p["group"]]] += p["n"]
        smallest[index[p["group"]]].append(np.asarray(p["ranks"], dtype=np.uint64))
    share = quotas(sizes, limit)
    # The share-th smallest rank of each group: its rows up to that rank are the sample.
    cut = {}
    for name, g in index.items():
        if share[g]:
            ranks = np.sort(np.concatenate(smallest[g]))
            cut[name] = int(ranks[share[g] - 1])

    def pick(block: pa.Table) -> pa.Table:
        if not block.num_rows:
            return block
        keys, ranks = group_keys(block), uri_ranks(block)
        picked = np.array([k in cut for k in keys], dtype=bool)
        limits = np.array([cut.get(k, 0) for k in keys], dtype=np.uint64)
        keep = picked & (ranks <= limits)
        return block.filter(pa.array(keep))

    return ds.map_batches(pick, batch_size=None, batch_format="pyarrow")
