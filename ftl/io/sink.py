"""A Ray Data sink that splits each block into features and quarantine, each part one commit to its table.

Each write task writes a data file and commits it to the table's log with the run's epoch
(ftl.io.table.append): readers, and a rerun after a crash, see only committed parts, and a run
that was fenced by a newer one commits nothing. An image lands in exactly one of the two tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block

from ftl.io import retry, schema, storage, table

FEATURES, QUARANTINE = schema.FEATURES, schema.QUARANTINE_FOLDER
COUNTS = ("ok", "quarantined", "done", "retry")
# A commit rides out a short storage outage before the task fails: commits are idempotent
# (a part's key is hashed from its rows and found in the log), so trying one again is always safe.
COMMIT_ATTEMPTS = retry.OUTAGE_ATTEMPTS


class SplitSink(Datasink):
    """Rows with an error go to `quarantine/`, rows marked done are only counted, the rest to `folder`."""

    def __init__(self, out: storage.Location, *, folder: str, schema: pa.Schema, rows_per_file: int,
                 fence: table.Fence, quarantine_from: dict[str, str] | None = None):
        self.out, self.folder, self.schema = out, folder, schema
        self.rows_per_file = rows_per_file
        # Quarantine columns taken from other block columns, e.g. the listed label under another name.
        self.quarantine_from = quarantine_from or {}
        self.fence = fence  # the run's epoch, carried by every commit
        self.counts = dict.fromkeys(COUNTS, 0)

    @property
    def min_rows_per_write(self) -> int:
        # Fewer, larger files: engines read thousands of tiny parts slowly.
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return dict.fromkeys(COUNTS, 0)
        table = pa.concat_tables(tables, promote_options="permissive")
        done = pc.equal(table["stage"], schema.STAGE_DONE)  # already in the output; only counted
        retry = pc.equal(table["stage"], schema.STAGE_RETRY)  # not read this time: left for the next run
        failed = pc.not_equal(table["error"], schema.ERROR_NONE)
        good = table.filter(pc.and_(pc.invert(failed), pc.invert(done)))
        quarantined = table.filter(pc.and_(failed, pc.invert(retry)))
        if good.num_rows:
            self.commit(good.select(self.schema.names).cast(self.schema), self.folder)
        if quarantined.num_rows:
            q = pa.table({c: quarantined[self.quarantine_from.get(c, c)] for c in schema.QUARANTINE.names})
            self.commit(q.cast(schema.QUARANTINE), QUARANTINE)
        return {"ok": good.num_rows, "quarantined": quarantined.num_rows, "done": pc.sum(done).as_py() or 0,
                "retry": pc.sum(retry).as_py() or 0}

    def commit(self, rows: pa.Table, folder: str) -> None:
        """One part, one commit to the folder's table; a fenced run's commit is refused by the log."""
        target = table.Table.at(self.out.join(folder))
        retry.with_retries(lambda: table.append(target, rows, fence=self.fence), attempts=COMMIT_ATTEMPTS)

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            for k in self.counts:
                self.counts[k] += r[k]


def feature_sink(out: storage.Location, prov: schema.Provenance, *, rows_per_file: int, fence: table.Fence) -> SplitSink:
    return SplitSink(out, folder=FEATURES, schema=schema.features(prov), rows_per_file=rows_per_file, fence=fence)
