"""An output's tables (features, quarantine, predictions) as Delta Lake tables, committed through their log.

A commit is one conditional write of the next log entry. Every commit a run makes carries its
lease epoch as an app transaction (`txn`, app id `ftl`) in that same entry. A run starts by
committing its epoch to each table (`fence`); from then on a commit is made only from a snapshot
whose epoch is the run's own, and a commit racing another one on the same version is refused by
the log (two `txn`s for one app id conflict). So a writer that stalled past its lease, or whose
host's clock is wrong, commits nothing once a newer run has fenced the table: the log refuses it,
not a check made beforehand.

Readers see only the files the log names: DuckDB, Polars, pandas, Spark, `ray.data.read_delta`.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ftl.errors import FtlError
from ftl.io import storage
from ftl.io.lease import LeaseLost

APP_ID = "ftl"  # the app transaction id whose version is the writing run's lease epoch
LOG = "_delta_log"
# Attempts at one commit that keeps losing the race to other commits of the same run; each one
# re-reads the log, so a lost lease is seen at the next attempt.
COMMIT_ATTEMPTS = 50
# Deleting superseded rows: ids per predicate, so that a predicate stays a few hundred KB.
DELETE_CHUNK = 5_000
# Test hooks for deterministic stalled-writer tests, called between a commit's last check and the
# commit itself: a write task that finds HOLD_ENV set waits until that file exists (it creates
# `<file>.reached` first); in one process, `before_commit` may be set to any callable.
HOLD_ENV = "FTL_HOLD_BEFORE_COMMIT"
before_commit = None


@dataclass(frozen=True)
class Fence:
    """What a commit carries: the run's epoch (picklable, sent to every write task)."""

    epoch: int
    run: str = ""  # who wrote: host/pid/Ray job, shown by `ftl versions`


@dataclass(frozen=True)
class Table:
    """A Delta table at a Location, with the options deltalake's object store needs."""

    loc: storage.Location
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def at(cls, loc: storage.Location) -> "Table":
        return cls(loc, delta_options(loc))

    @property
    def uri(self) -> str:
        return self.loc.path if self.loc.is_local else self.loc.uri

    def exists(self) -> bool:
        return self.loc.fs.exists(self.loc.join(LOG).path)

    def open(self, version: int | None = None):
        from deltalake import DeltaTable

        return DeltaTable(self.uri, version=version, storage_options=self.options or None)

    def version(self) -> int | None:
        return self.open().version() if self.exists() else None

    def epoch(self) -> int:
        return (self.open().transaction_version(APP_ID) or 0) if self.exists() else 0

    def description(self) -> dict:
        return json.loads(self.open().metadata().description or "{}")

    def dataset(self, version: int | None = None):
        """A pyarrow dataset of the committed rows (at `version`, or the latest)."""
        return self.open(version).to_pyarrow_dataset()


def delta_options(loc: storage.Location) -> dict:
    """The Location's filesystem settings in deltalake's (object_store's) terms."""
    if loc.is_local:
        return {}
    protocol = loc.fs.protocol if isinstance(loc.fs.protocol, str) else loc.fs.protocol[0]
    if protocol not in ("s3", "s3a"):
        return {}
    kw = getattr(loc.fs, "client_kwargs", {}) or {}
    endpoint = kw.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    opts = {"conditional_put": "etag"}  # the next log entry is put-if-absent: S3's If-None-Match
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    region = kw.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    for attr, key in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if getattr(loc.fs, attr, None):
            opts[key] = getattr(loc.fs, attr)
    return opts


def delta_schema(schema: pa.Schema) -> pa.Schema:
    """Delta has no fixed-size lists: vectors are stored as list<float> (their dims live in the description)."""
    fields = [pa.field(f.name, pa.list_(f.type.value_type), f.nullable) if pa.types.is_fixed_size_list(f.type) else f
              for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def fence(table: Table, *, schema: pa.Schema, description: dict, fence: Fence) -> int:
    """Commit this run's epoch to the table (creating it if absent); returns the version it made.

    Refused with LeaseLost if the table already carries this epoch or a newer one: another run
    fenced it since this run took its lease.
    """
    from deltalake import CommitProperties, DeltaTable, Transaction
    from deltalake.exceptions import CommitFailedError

    props = CommitProperties(app_transactions=[Transaction(APP_ID, fence.epoch)], custom_metadata=meta(fence, 0))
    for _ in range(COMMIT_ATTEMPTS):
        if not table.exists():
            try:
                DeltaTable.create(table.uri, schema=delta_schema(schema), mode="error", name=posixpath.basename(
                    table.loc.path), description=json.dumps(description, sort_keys=True),
                    storage_options=table.options or None, commit_properties=props)
                return 0
            except Exception:  # another run created it first: fence it like any table
                if not table.exists():
                    raise
                continue
        dt = table.open()
        if landed(table, dt, fence):  # an earlier try landed, though its answer was lost
            return dt.version()
        check(table, dt, fence, newer_only=True)
        try:
            dt.create_write_transaction([], mode="append", schema=dt.schema(), commit_properties=props)
            return dt.version() + 1
        except CommitFailedError:
            continue
    raise FtlError(f"could not fence {table.loc.uri}: every commit lost a race ({COMMIT_ATTEMPTS} attempts)")


def landed(table: Table, dt, fence: Fence) -> bool:
    """This run's own fence is already in the log (the epoch is ours, and so is the run that wrote it)."""
    if (dt.transaction_version(APP_ID) or 0) != fence.epoch or not fence.run:
        return False
    return any(c.get("ftl.epoch") == str(fence.epoch) and c.get("ftl.run") == fence.run
               for c in commits(table, limit=20))


def check(table: Table, dt, fence: Fence, *, newer_only: bool = False) -> None:
    """The epoch in this snapshot of the log is ours (or, when fencing, older than ours)."""
    found = dt.transaction_version(APP_ID) or 0
    if found == fence.epoch and not newer_only or found < fence.epoch and newer_only:
        return
    raise LeaseLost(f"{table.loc.uri} was fenced by a newer run (epoch {found}, this run's {fence.epoch}); this run "
                    f"stopped committing. Rerun it once the other run is done: it does only what is missing.")


def meta(fence: Fence, rows: int) -> dict:
    return {"ftl.epoch": str(fence.epoch), "ftl.run": fence.run, "ftl.rows": str(rows)}


def append(table: Table, rows: pa.Table, *, fence: Fence) -> bool:
    """Commit `rows` as one data file; False if an earlier try of the same task had committed them.

    The file's name starts with a key hashed from its image ids: a write task that Ray retries
    after its commit finds that key in the log and commits nothing twice.
    """
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError

    key = storage.part_name(rows["image_id"]).removesuffix(".parquet")
    add = write_file(table, rows, name=f"{key}-{uuid.uuid4().hex[:8]}.parquet")
    props = CommitProperties(app_transactions=[Transaction(APP_ID, fence.epoch)],
                             custom_metadata=meta(fence, rows.num_rows))
    for _ in range(COMMIT_ATTEMPTS):
        dt = table.open()
        check(table, dt, fence)
        if any(p.startswith(key) for p in dt.get_add_actions(flatten=True).column("path").to_pylist()):
            return False
        hold_for_test()
        try:
            dt.create_write_transaction([add], mode="append", schema=dt.schema(), commit_properties=props)
            return True
        except CommitFailedError:  # another commit took this version: check again on the new snapshot
            continue
    raise FtlError(f"could not commit to {table.loc.uri}: every commit lost a race ({COMMIT_ATTEMPTS} attempts)")


def write_file(table: Table, rows: pa.Table, *, name: str):
    """A data file under the table's folder, not yet in the log (readers do not see it)."""
    from deltalake.transaction import AddAction

    rows = rows.cast(delta_schema(rows.schema))
    path = table.loc.join(name).path
    table.loc.fs.makedirs(table.loc.path, exist_ok=True)
    with table.loc.fs.open(path, "wb") as f:
        pq.write_table(rows, f, compression="zstd")
    size = table.loc.fs.size(path)
    ids = rows["image_id"]
    stats = {"numRecords": rows.num_rows, "nullCount": {"image_id": 0}}
    if rows.num_rows:
        stats |= {"minValues": {"image_id": pc.min(ids).as_py()}, "maxValues": {"image_id": pc.max(ids).as_py()}}
    return AddAction(name, size, {}, int(time.time() * 1000), True, json.dumps(stats))


def hold_for_test() -> None:
    if before_commit is not None:
        before_commit()
    release = os.environ.get(HOLD_ENV)
    if not release:
        return
    open(release + ".reached", "w").close()
    while not os.path.exists(release):
        time.sleep(0.05)


def delete(table: Table, ids: list[str], *, fence: Fence) -> int:
    """Remove the rows of `ids` by log actions (their files are rewritten without them); rows removed."""
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError

    removed = 0
    for i in range(0, len(ids), DELETE_CHUNK):
        chunk = ids[i : i + DELETE_CHUNK]
        predicate = "image_id IN (" + ", ".join("'" + x.replace("'", "''") + "'" for x in chunk) + ")"
        props = CommitProperties(app_transactions=[Transaction(APP_ID, fence.epoch)],
                                 custom_metadata=meta(fence, -len(chunk)))
        for _ in range(COMMIT_ATTEMPTS):
            dt = table.open()
            check(table, dt, fence)
            try:
                removed += dt.delete(predicate, commit_properties=props).get("num_deleted_rows", 0)
                break
            except CommitFailedError:
                continue
        else:
            raise FtlError(f"could not delete from {table.loc.uri}: every commit lost a race")
    return removed


def committed_by(t: Table, epoch: int) -> int:
    """Rows the run of `epoch` added to the table (from its commits' metadata)."""
    if not t.exists():
        return 0
    return sum(max(int(h.get("ftl.rows", 0)), 0) for h in commits(t) if h.get("ftl.epoch") == str(epoch))


def commits(t: Table, *, limit: int | None = None) -> list[dict]:
    """The commitInfo of each log entry, newest first, read as files: deltalake's own `history()` holds
    the GIL through its requests, which starves an S3 server that lives in the same process."""
    log = t.loc.join(LOG)
    entries = sorted((p for p in t.loc.fs.ls(log.path, detail=False) if p.endswith(".json")), reverse=True)
    out = []
    for path in entries[:limit]:
        for line in t.loc.fs.cat_file(path).decode().splitlines():
            action = json.loads(line) if line.strip() else {}
            if "commitInfo" in action:
                out.append({**action["commitInfo"], "version": int(posixpath.basename(path).split(".")[0])})
    return out


def history(t: Table, *, limit: int | None = None) -> list[dict]:
    """The table's versions, newest first: when, what, rows, and which run (epoch, holder) made each."""
    out = []
    for h in commits(t, limit=limit):
        rows = int(h.get("ftl.rows", 0) or 0)
        what = {"CREATE TABLE": "created", "DELETE": "removed superseded rows"}.get(h.get("operation"), "")
        if not what:
            what = "converted from Parquet" if "ftl.converted" in h else f"{rows} rows" if rows > 0 else "fence"
        out.append({"version": h.get("version"), "time": time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.get("timestamp", 0) / 1000)), "what": what,
            "epoch": h.get("ftl.epoch", "-"), "run": h.get("ftl.run", "")})
    return out
