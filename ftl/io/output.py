"""Writing into an output: one run at a time (the lease), one identity per output, its tables fenced.

Extract and predict both open their output with `writing()`: it takes the lease, claims the
output's identity file (`_ftl.json`: the feature set, or the model that wrote the predictions),
converts tables an older ftl wrote as plain Parquet, and commits the run's epoch to every table
(ftl.io.table.fence). Only then does the run list and diff.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from ftl.config import StorageConfig
from ftl.io import lease, legacy, retry, storage, table
from ftl.io.lease_store import store_for

IDENTITY_FILE = "_ftl.json"
STAGING = "_staging"


@dataclass
class Writing:
    """What a run holds while it writes: the lease, its fence, and the fenced tables by folder."""

    held: lease.Lease
    fence: table.Fence
    tables: dict[str, table.Table]
    fenced_at: dict[str, int]  # folder → the version the run's fence commit made

    def versions(self) -> dict[str, int | None]:
        return {name: t.version() for name, t in self.tables.items()}

    def committed(self) -> dict[str, int]:
        return {name: table.committed_by(t, self.fence.epoch) for name, t in self.tables.items()}


@contextlib.contextmanager
def writing(out: storage.Location, *, identity: dict, key: str, storage_cfg: StorageConfig, what: str,
            mismatch: Callable[[dict, dict], Exception], schemas: dict[str, pa.Schema], description: dict,
            recover: Callable[[], dict | None] = lambda: None) -> Iterator[Writing]:
    """Hold `out`'s lease, claim it for `identity` (compared on `identity[key]`), fence each table of `schemas`."""
    with lease.hold(out, ttl=storage_cfg.lease_ttl, wait=storage_cfg.lease_wait, what=what,
                    on_lost=interrupt_main) as held:
        claim(out, identity, key=key, mismatch=mismatch, recover=recover)
        staging = out.join(STAGING)
        if out.fs.exists(staging.path):  # staged parts of an older ftl's dead run
            out.fs.rm(staging.path, recursive=True)
        tables = {name: table.Table.at(out.join(name)) for name in schemas}
        epoch = max([held.epoch] + [t.epoch() + 1 for t in tables.values()])
        fence = table.Fence(epoch, run=f"{lease.describe(held.record)} [{held.record['token'][:8]}]")
        fenced = {}
        for name, t in tables.items():
            converted = legacy.convert(t, schema=schemas[name], description=description, fence=fence)
            # Retried through a short storage outage, as commits are: a fence is idempotent until it lands.
            fenced[name] = converted if converted is not None else retry.with_retries(lambda: table.fence(
                t, schema=schemas[name], description=description, fence=fence), attempts=retry.OUTAGE_ATTEMPTS)
        writing = Writing(held, fence, tables, fenced)
        try:
            yield writing
            # A driver frozen past its ttl may finish before its renew thread runs again: the log,
            # not the thread, says whether a newer run fenced the tables while this one worked.
            for t in tables.values():
                table.check(t, retry.with_retries(t.open, attempts=retry.OUTAGE_ATTEMPTS), fence)
        except (KeyboardInterrupt, table.LeaseLost) as e:
            if not held.lost and not isinstance(e, table.LeaseLost):
                raise
            rows = ", ".join(f"{n} rows to {name}" for name, n in writing.committed().items())
            raise lease.LeaseLost(f"this run lost the lease on {out.uri} ({held.lost or e}) and stopped; it had "
                                  f"committed {rows}. Rerun once the other run is done: it does only what is "
                                  f"missing.") from None


def interrupt_main(why: str) -> None:
    """The lease is lost: stop the run's pipeline now, as Ctrl-C would (`writing` turns it into LeaseLost)."""
    if threading.current_thread() is not threading.main_thread():
        _thread.interrupt_main()


def claim(out: storage.Location, identity: dict, *, key: str, mismatch: Callable[[dict, dict], Exception],
          recover: Callable[[], dict | None]) -> None:
    """Create the identity file if absent (atomically: all of it or none); else check it is ours.

    A damaged file (a crash mid-write by an older ftl, a hand edit) is rebuilt from what the
    output's own tables say (`recover`), or replaced when the output holds nothing yet.
    """
    store, path = store_for(out.fs), out.join(IDENTITY_FILE).path
    data = json.dumps(identity, indent=2, sort_keys=True).encode()
    if store.create(path, data) is not None:
        return
    found = store.read(path)
    if found is None:  # removed by hand between the two calls: claim it again
        return claim(out, identity, key=key, mismatch=mismatch, recover=recover)
    try:
        existing = json.loads(found[0])
        existing[key]
    except (ValueError, KeyError, TypeError):
        existing = recover()
        if existing is None:
            store.replace(path, data, expected=found[1])
            return
        store.replace(path, json.dumps(existing, indent=2, sort_keys=True).encode(), expected=found[1])
    if existing[key] != identity[key]:
        raise mismatch(existing, identity)
