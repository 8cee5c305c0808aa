"""What a run still has to do: the listing against what the output's tables already hold.

The done ids are never collected into one set. The listing (which the driver holds anyway)
becomes a sorted array of 16-byte ids; the id and uri columns of the committed rows (the files
the table's log names) are streamed against it in batches. Driver memory beyond the listing: about 25 bytes per listed
image kept (key, sort order, found flag), 32 more while the keys are built, plus one batch,
whatever the size of the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ftl.io import retry, storage, table

BATCH_ROWS = 65_536
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


@dataclass
class Diff:
    todo: pa.Table
    already_done: int
    superseded: dict[str, set[str]] = field(default_factory=dict)  # table folder → stale image ids
    gone: int = 0  # rows whose image no longer is in the source: reported, never deleted

    @property
    def superseded_rows(self) -> int:
        return sum(len(ids) for ids in self.superseded.values())


def id_bytes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """32-char hex image ids → (N,) array of 16-byte keys (numpy sorts and searches these).

    Read straight from the Arrow data buffer: no Python string per id.
    """
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if arr.type != pa.string():
        arr = pc.cast(arr, pa.string())
    if arr.null_count:
        raise ValueError("image_id has nulls; the output is damaged")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    if offsets[-1] - offsets[0] != 32 * len(arr):
        raise ValueError("image_id values must be 32 hex characters, as ftl writes them")
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    nibbles = _HEX[raw.reshape(-1, 32)]
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view("S16").ravel()


class Membership:
    """Which listed ids a stream of done ids covers, via binary search in the sorted listing."""

    def __init__(self, listing_ids: pa.ChunkedArray):
        keys = id_bytes(listing_ids)
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]
        self.found = np.zeros(len(keys), dtype=bool)

    def mark(self, ids: pa.Array) -> np.ndarray:
        """Mark listed ids seen in `ids`; returns which of `ids` are listed at all."""
        keys = id_bytes(ids)
        pos = np.searchsorted(self.sorted, keys).clip(max=max(len(self.sorted) - 1, 0))
        hit = self.sorted[pos] == keys if len(self.sorted) else np.zeros(len(keys), bool)
        self.found[self.order[pos[hit]]] = True
        return hit


def committed(out: storage.Location, folder: str, columns: list[str]):
    """Record batches of the committed rows of one of the output's tables (none if it has no table yet)."""
    t = table.Table.at(out.join(folder))
    if not t.exists():
        return
    yield from t.dataset().to_batches(columns=columns, batch_size=BATCH_ROWS)


def diff(listing: pa.Table, out: storage.Location, folders: tuple[str, ...]) -> Diff:
    """Pending images, plus rows to supersede (their image changed) and rows whose image is gone."""
    member = Membership(listing["image_id"])
    stale: dict[str, list[pa.Table]] = {}
    for folder in folders:
        for batch in committed(out, folder, ["image_id", "uri"]):
            listed = member.mark(batch.column("image_id"))
            if not listed.all():
                stale.setdefault(folder, []).append(pa.Table.from_batches([batch]).filter(pa.array(~listed)))
    todo = listing.filter(pa.array(~member.found))
    result = Diff(todo=todo, already_done=listing.num_rows - todo.num_rows)
    # Unlisted rows are few (changed or removed images): hash those, never the whole listing.
    if stale:
        unlisted = pa.concat_arrays([t["uri"].combine_chunks() for ts in stale.values() for t in ts])
        relisted = listing["uri"].filter(pc.is_in(listing["uri"], value_set=unlisted))
    for folder, tables in stale.items():
        rows = pa.concat_tables(tables)
        changed = pc.is_in(rows["uri"], value_set=relisted)
        if pc.any(changed).as_py():
            result.superseded[folder] = set(rows.filter(changed)["image_id"].to_pylist())
        result.gone += rows.num_rows - int(pc.sum(changed).as_py() or 0)
    return result


def supersede(out: storage.Location, stale: dict[str, set[str]], *, fence: table.Fence) -> None:
    """Remove the old rows of changed images, by a fenced log commit, before their new rows are written.

    A crash after the removal leaves those images missing, never doubled: the next run extracts them.
    """
    for folder, ids in stale.items():
        t = table.Table.at(out.join(folder))
        retry.with_retries(lambda: table.delete(t, sorted(ids), fence=fence), attempts=retry.OUTAGE_ATTEMPTS)
