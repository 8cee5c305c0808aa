"""Reading what landed: an output's tables through their Delta log, as any engine would."""

from __future__ import annotations

import pyarrow as pa

from ftl.io import storage, table


def read(path, columns=None, *, version: int | None = None, storage_options: dict | None = None) -> pa.Table:
    """The committed rows of the table at `path` (local or s3://), at `version` or the latest."""
    t = table.Table.at(storage.locate(str(path), storage_options))
    assert t.exists(), f"no Delta table at {path}"
    return t.dataset(version).to_table(columns=columns)


def frame(path, **kwargs):
    return read(path, **kwargs).to_pandas()


def version(path, storage_options: dict | None = None) -> int | None:
    return table.Table.at(storage.locate(str(path), storage_options)).version()


def write(path, rows: pa.Table, *, description: dict) -> None:
    """A new table of `rows`, committed as ftl commits (one epoch), for tests that shape their own features."""
    t = table.Table.at(storage.locate(str(path)))
    fence = table.Fence(1, run="test")
    table.fence(t, schema=rows.schema, description=description, fence=fence)
    if rows.num_rows:
        table.append(t, rows, fence=fence)


def description(path) -> dict:
    return table.Table.at(storage.locate(str(path))).description()
