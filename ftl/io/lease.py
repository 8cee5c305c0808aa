"""One writer per output at a time: a lease object taken with a conditional create, renewed while the run lives.

`<output>/_ftl.lease` holds JSON naming its holder (host, pid, Ray job) and since when. A run
takes it with a create-if-absent (S3 `If-None-Match: *`, a hard link locally) and renews it every
third of its time to live with a compare-and-swap on its ETag (S3 `If-Match`; an flock'ed mutex
locally). Release is the same swap, to a record marked released.

Expiry is judged on the taker's own monotonic clock: a lease is taken over only once its record
has stayed unchanged (the same ETag) for a full ttl as this host watched it. Wall clocks of two
hosts are never compared, so a taker whose clock runs ahead cannot take a live lease.

The lease keeps two runs from doing the same work; exactness does not rest on it. Each run's
commits carry its epoch in the tables' own log (ftl.io.table), which refuses a run that was fenced.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from ftl.errors import FtlError
from ftl.io import storage
from ftl.io.lease_store import store_for

LEASE_FILE = "_ftl.lease"


class LeaseHeld(FtlError):
    """Another run writes into this output now."""


class LeaseLost(FtlError):
    """This run's lease was taken over; it must not commit anything more."""


def holder() -> dict:
    """Who takes the lease: enough for a person to find the other run."""
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), **({"ray_job": job} if job else {})}


def describe(record: dict) -> str:
    who = ", ".join(f"{k} {v}" for k, v in record.get("holder", {}).items())
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("since", 0)))
    return f"{who} since {since}"


class Lease:
    """A held lease; renews itself in a daemon thread until released, and calls `on_lost` if it cannot."""

    def __init__(self, out: storage.Location, *, ttl: float, etag: str, record: dict, on_lost=None):
        self.out, self.ttl, self.etag, self.record = out, ttl, etag, record
        self.path = out.join(LEASE_FILE).path
        self.store = store_for(out.fs)
        self.lost: str | None = None
        self.on_lost = on_lost
        self.renewed = time.monotonic()  # when this host last saw its renewal land
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew_loop, name="ftl-lease", daemon=True)
        self.thread.start()

    @property
    def epoch(self) -> int:
        return self.record["epoch"]

    def _renew_loop(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as e:  # a flaky store: keep trying while a taker would still wait
                if time.monotonic() - self.renewed > self.ttl * 2 / 3:
                    self._lose(f"could not renew it for {self.ttl * 2 / 3:.0f}s ({type(e).__name__}: {e})")
            if self.lost:
                return

    def renew(self) -> None:
        record = {**self.record, "renewed": time.time()}
        etag = self.store.replace(self.path, encode(record), expected=self.etag)
        if etag is None:
            self._lose("another run took it over")
            return
        self.etag, self.record, self.renewed = etag, record, time.monotonic()

    def _lose(self, why: str) -> None:
        # A taker waits a full ttl after the last change it saw; stopping before 2/3 of a ttl without
        # a renewal leaves a third of a ttl for this run's tasks to stop.
        self.lost = why
        self.stop.set()
        if self.on_lost is not None:
            self.on_lost(why)

    def check(self) -> None:
        """Raise if the lease was lost; the driver calls this before and after the work it guards."""
        if self.lost:
            raise LeaseLost(f"lost the lease on {self.out.uri}: {self.lost}. Rerun once the other run is done; "
                            f"it does only what is missing.")

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if not self.lost:  # a swap on our own ETag: a successor's lease is never touched
            self.store.replace(self.path, encode({**self.record, "released": time.time()}), expected=self.etag)


def encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def decode(data: bytes) -> dict:
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:  # a half-written lease from a crashed writer of an older ftl
        return {}


class Taker:
    """One attempt after another at taking the lease; remembers how long this host saw each record unchanged."""

    def __init__(self, out: storage.Location, *, ttl: float, on_lost=None):
        self.out, self.ttl, self.on_lost = out, ttl, on_lost
        self.store, self.path = store_for(out.fs), out.join(LEASE_FILE).path
        self.seen: tuple[str, float] | None = None  # (ETag, monotonic time it was first seen)

    def record(self, epoch: int) -> dict:
        now = time.time()
        return {"holder": holder(), "since": now, "renewed": now, "epoch": epoch, "token": uuid.uuid4().hex}

    def attempt(self) -> tuple[Lease | None, dict | None]:
        """(lease, None) if taken; else (None, the holder's record), or (None, {}) to try again at once."""
        mine = self.record(1)
        etag = self.store.create(self.path, encode(mine))
        if etag is not None:
            return Lease(self.out, ttl=self.ttl, etag=etag, record=mine, on_lost=self.on_lost), None
        found = self.store.read(self.path)
        if found is None:  # released by deletion (an older ftl) between our create and our read
            return None, {}
        data, current = found
        existing = decode(data)
        now = time.monotonic()
        if self.seen is None or self.seen[0] != current:
            self.seen = (current, now)
        free = "released" in existing or not existing.get("holder")
        if not free and now - self.seen[1] < self.ttl:
            return None, existing
        mine = self.record(int(existing.get("epoch", 0)) + 1)
        etag = self.store.replace(self.path, encode(mine), expected=current)
        if etag is None:  # another run took it over first
            return None, {}
        return Lease(self.out, ttl=self.ttl, etag=etag, record=mine, on_lost=self.on_lost), None

    def watched(self) -> float:
        return time.monotonic() - self.seen[1] if self.seen else 0.0


def try_take(out: storage.Location, *, ttl: float) -> tuple[Lease | None, dict | None]:
    """One attempt: takes a free or released lease; a held one only after watching it (see `hold`)."""
    return Taker(out, ttl=ttl).attempt()


@contextlib.contextmanager
def hold(out: storage.Location, *, ttl: float = 60.0, wait: float = 0.0, what: str = "run", on_lost=None,
         looks_abandoned=None):
    """Hold the output's lease for the duration of the block; fail at once (or after `wait` s) if held.

    A lease whose holder has not renewed it within a ttl (as its `renewed` time reads on this
    host's clock: a hint only) is watched for one ttl before it is taken, even with `wait` 0, so a
    run after a crash takes over without being told to wait. The deadline is never passed.
    """
    out.fs.makedirs(out.path, exist_ok=True)
    taker = Taker(out, ttl=ttl, on_lost=on_lost)
    deadline = time.monotonic() + wait
    extended = False
    while True:
        lease, other = taker.attempt()
        if lease is not None:
            break
        if other and not extended and time.time() - other.get("renewed", 0) > ttl:
            deadline, extended = max(deadline, time.monotonic() + ttl + poll(ttl)), True
        left = deadline - time.monotonic()
        if left <= -ttl:  # the record keeps vanishing or being replaced under us: say who, if anyone
            other = other or {"holder": {"unknown": "a run that keeps replacing the lease"}}
        if left <= 0 and other:
            raise LeaseHeld(
                f"{out.uri} is being written by another {what}: {describe(other)}. Wait for it to finish, or "
                f"set storage.lease_wait=<seconds> to wait for it; a run that died frees its lease once it has "
                f"gone unrenewed for storage.lease_ttl ({ttl:.0f}s).")
        time.sleep(max(0.0, min(poll(ttl), left)) if other else 0.0)
    try:
        yield lease
        lease.check()
    finally:
        lease.release()


def poll(ttl: float) -> float:
    return min(1.0, max(0.05, ttl / 10))
