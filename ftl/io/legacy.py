"""Outputs an older ftl wrote (plain Parquet parts under features/, quarantine/, predictions/), converted in place.

The old parts are copied into the new table's data files in one commit that carries the run's
epoch, then deleted. A crash in between leaves the old parts beside a table that already holds
their rows; the next run finds the table and deletes the leftovers without reading them.
"""

from __future__ import annotations

import posixpath
import re

import pyarrow.parquet as pq

from ftl.io import storage, table

OLD_NAME = re.compile(r"part-[0-9a-f]+\.parquet")  # an older ftl's part name


def old_parts(t: table.Table) -> list[str]:
    """Parquet files directly in the table's folder that no table wrote: any, without a log; else by their name."""
    loc = t.loc
    if not loc.fs.exists(loc.path):
        return []
    found = sorted(p for p in loc.fs.ls(loc.path, detail=False) if p.endswith(".parquet"))
    if not found or not t.exists():
        return found
    # The log's own data files never match: their names carry a suffix after the key.
    return [p for p in found if OLD_NAME.fullmatch(posixpath.basename(p))]


def convert(t: table.Table, *, schema, description: dict, fence: table.Fence) -> int | None:
    """Convert the old parts of `t`'s folder into a new Delta table; the version made, or None if none was due.

    The table is created (and so fenced) by this run: the caller must not fence it again.
    """
    parts = old_parts(t)
    if not parts:
        return None
    if t.exists():  # converted by a run that died before deleting the old parts
        for p in parts:
            t.loc.fs.rm_file(p)
        return None
    table.fence(t, schema=schema, description=description, fence=fence)
    adds, rows = [], 0
    for p in parts:
        with t.loc.fs.open(p, "rb") as f:
            old = pq.read_table(f)
        new = old.select(schema.names).cast(table.delta_schema(schema))
        name = storage.part_name(new["image_id"]).removesuffix(".parquet") + "-converted.parquet"
        adds.append(table.write_file(t, new, name=name))
        rows += new.num_rows
    dt = t.open()
    table.check(t, dt, fence)
    from deltalake import CommitProperties, Transaction

    dt.create_write_transaction(adds, mode="append", schema=dt.schema(), commit_properties=CommitProperties(
        app_transactions=[Transaction(table.APP_ID, fence.epoch)],
        custom_metadata=table.meta(fence, rows) | {"ftl.converted": str(len(parts))}))
    for p in parts:
        t.loc.fs.rm_file(p)
    return dt.version() + 1
