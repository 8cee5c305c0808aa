"""A Ray Data sink that splits each block into features and quarantine, committed atomically.

Each write task stages a Parquet part and renames it into place, so a reader (or a rerun
after a crash) sees only whole parts. An image lands in exactly one of the two folders.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block

from ftl.io import schema, storage

FEATURES = "features"
QUARANTINE = "quarantine"


class SplitSink(Datasink):
    """Rows with an error go to `quarantine/`, rows marked done are only counted, the rest to `folder`."""

    def __init__(self, out: storage.Location, *, folder: str, schema: pa.Schema, rows_per_file: int,
                 quarantine_from: dict[str, str] | None = None):
        self.out, self.folder, self.schema = out, folder, schema
        self.rows_per_file = rows_per_file
        # Quarantine columns taken from other block columns, e.g. the listed label under another name.
        self.quarantine_from = quarantine_from or {}
        self.counts = {"ok": 0, "quarantined": 0, "done": 0}

    @property
    def min_rows_per_write(self) -> int:
        # Fewer, larger files: engines read thousands of tiny parts slowly.
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"ok": 0, "quarantined": 0, "done": 0}
        table = pa.concat_tables(tables, promote_options="permissive")
        done = pc.equal(table["stage"], schema.STAGE_DONE)  # already in the output; only counted
        bad = pc.not_equal(table["error"], schema.ERROR_NONE)
        good = table.filter(pc.and_(pc.invert(bad), pc.invert(done)))
        quarantined = table.filter(bad)
        name = f"part-{uuid.uuid4().hex}.parquet"
        if good.num_rows:
            storage.write_table_atomic(good.select(self.schema.names).cast(self.schema), self.out.join(self.folder), name)
        if quarantined.num_rows:
            q = pa.table({c: quarantined[self.quarantine_from.get(c, c)] for c in schema.QUARANTINE.names})
            storage.write_table_atomic(q.cast(schema.QUARANTINE), self.out.join(QUARANTINE), name)
        return {"ok": good.num_rows, "quarantined": quarantined.num_rows, "done": pc.sum(done).as_py() or 0}

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            for k in self.counts:
                self.counts[k] += r[k]


def feature_sink(out: storage.Location, prov: dict, *, rows_per_file: int) -> SplitSink:
    return SplitSink(out, folder=FEATURES, schema=schema.features(prov), rows_per_file=rows_per_file)
