"""What a run still has to do, found by Ray Data joins partitioned by image id: the driver gets counts.

The committed rows' ids and URIs are read from the data files the tables' logs name (one read
task per file, no listing of the output), then hash-joined with the listing:
    todo       = listing ⋉̸ committed        (left anti join on image_id)
    stale      = committed ⋉̸ listing        (committed rows whose id is no longer listed)
    superseded = stale ⋉ listing on uri     (the image is listed under a new version)
    gone       = stale − superseded         (the image left the source: counted, kept)
Only the superseded ids reach the driver, for the fenced DELETE that must precede their new rows;
they are as many as the images that changed since the last run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from ftl.io import storage, table

# Rows per join partition: a partition is joined in one task's memory.
ROWS_PER_PARTITION = 500_000
MIN_PARTITIONS = 4
FILES_PER_TASK = 8
COMMITTED = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("_table", pa.string())])


@dataclass
class ScaledDiff:
    todo: object  # a materialized Ray Dataset of the listing's pending rows
    todo_rows: int
    already_done: int
    superseded: dict[str, set[str]] = field(default_factory=dict)
    gone: int = 0

    @property
    def superseded_rows(self) -> int:
        return sum(len(ids) for ids in self.superseded.values())


def partitions(rows: int) -> int:
    return max(MIN_PARTITIONS, -(-rows // ROWS_PER_PARTITION))


def committed(out: storage.Location, folders: tuple[str, ...]):
    """A Ray Dataset of (image_id, uri, _table) over the committed rows of the tables, or None if none has rows.

    A task reads its data files itself: deltalake's rewrites store strings as string_view, and
    Ray's Parquet reader refuses files whose schemas differ so.
    """
    import ray.data

    items = []
    for folder in folders:
        t = table.Table.at(out.join(folder))
        if t.exists():
            items += [{"uri": u, "table": folder} for u in t.open().file_uris()]
    if not items:
        return None
    fs = out.fs  # fsspec filesystems travel to the tasks with their settings

    def read(batch: pa.Table) -> pa.Table:
        parts = []
        for uri, name in zip(batch["uri"].to_pylist(), batch["table"].to_pylist()):
            with fs.open(uri.removeprefix("file://") if out.is_local else storage.strip_scheme(uri), "rb") as f:
                rows = pq.read_table(f, columns=["image_id", "uri"]).cast(COMMITTED.remove(2))
            parts.append(rows.append_column("_table", pa.array([name] * rows.num_rows, pa.string())))
        return pa.concat_tables(parts)

    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=FILES_PER_TASK, batch_format="pyarrow")


def diff(listing, listed: int, out: storage.Location, folders: tuple[str, ...]) -> ScaledDiff:
    """`listing`: a materialized Ray Dataset of LISTING rows, `listed` of them."""
    done = committed(out, folders)
    if done is None:
        return ScaledDiff(todo=listing, todo_rows=listed, already_done=0)
    done = done.materialize()
    n = partitions(max(listed, done.count()))
    todo = listing.join(done.select_columns(["image_id"]), "left_anti", num_partitions=n,
                        on=("image_id",)).materialize()
    stale = done.join(listing.select_columns(["image_id"]), "left_anti", num_partitions=n,
                      on=("image_id",)).materialize()
    pending = todo.count()
    result = ScaledDiff(todo=todo, todo_rows=pending, already_done=listed - pending)
    stale_rows = stale.count()
    if not stale_rows:
        return result
    changed = stale.join(listing.select_columns(["uri"]), "left_semi", num_partitions=partitions(stale_rows),
                         on=("uri",)).select_columns(["image_id", "_table"])
    for batch in changed.iter_batches(batch_format="pyarrow", batch_size=65_536):
        for name, image_id in zip(batch["_table"].to_pylist(), batch["image_id"].to_pylist()):
            result.superseded.setdefault(name, set()).add(image_id)
    result.gone = stale_rows - result.superseded_rows
    return result
