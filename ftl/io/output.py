"""Writing into an output: one run at a time (the lease), one identity per output, no leftovers.

Extract and predict both open their output with `writing()`: it takes the lease, claims the
output's identity file (`_ftl.json`: the feature set, or the model that wrote the predictions),
and clears staged parts that a dead run left behind. Only then does the run list and diff.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

from ftl.config import StorageConfig
from ftl.io import lease, storage
from ftl.io.lease_store import store_for

IDENTITY_FILE = "_ftl.json"
STAGING = "_staging"


@contextlib.contextmanager
def writing(out: storage.Location, *, identity: dict, key: str, storage_cfg: StorageConfig, what: str,
            mismatch: Callable[[dict, dict], Exception], recover: Callable[[], dict | None] = lambda: None,
            ) -> Iterator[lease.Lease]:
    """Hold `out`'s lease, claim it for `identity` (compared on `identity[key]`), clear stale staging."""
    with lease.hold(out, ttl=storage_cfg.lease_ttl, wait=storage_cfg.lease_wait, what=what) as held:
        claim(out, identity, key=key, mismatch=mismatch, recover=recover)
        staging = out.join(STAGING)
        if out.fs.exists(staging.path):  # under the lease, whatever is staged belongs to a dead run
            out.fs.rm(staging.path, recursive=True)
        yield held


def claim(out: storage.Location, identity: dict, *, key: str, mismatch: Callable[[dict, dict], Exception],
          recover: Callable[[], dict | None]) -> None:
    """Create the identity file if absent (atomically: all of it or none); else check it is ours.

    A damaged file (a crash mid-write by an older ftl, a hand edit) is rebuilt from what the
    output's own parts say (`recover`), or replaced when the output holds no parts yet.
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
