"""One writer per output at a time: a lease file taken with a conditional create, renewed while the run lives.

`<output>/_ftl.lease` holds JSON naming its holder (host, pid, Ray job), since when it is held and
until when. A run takes it with a create-if-absent (S3 `If-None-Match: *`, `O_EXCL` locally) and
renews it every third of its time to live. A run that dies stops renewing, so its lease expires
and the next run replaces it with a compare-and-swap (S3 `If-Match` on the expired lease's ETag;
locally under an flock'ed mutex): of two runs taking over the same expired lease, one wins.

Write tasks check the lease's token before each commit (`Lease.check` from the sink), so a run
that lost its lease (it stalled past the time to live and another run took over) commits nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

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
    left = record.get("expires", 0) - time.time()
    return f"{who} since {since} (expires in {left:.0f}s unless renewed)"


@dataclass(frozen=True)
class Fence:
    """What a write task needs to check that its run still holds the lease: picklable, no thread."""

    out: storage.Location
    token: str

    def check(self) -> None:
        found = store_for(self.out.fs).read(self.out.join(LEASE_FILE).path)
        if found is None or json.loads(found[0]).get("token") != self.token:
            held = describe(json.loads(found[0])) if found else "nobody"
            raise LeaseLost(f"the lease on {self.out.uri} was taken over (now held by {held}); this run stopped "
                            f"committing. Rerun it once the other run is done: it does only what is missing.")


class Lease:
    """A held lease; renews itself in a daemon thread until released."""

    def __init__(self, out: storage.Location, *, ttl: float, token: str, etag: str, record: dict):
        self.out, self.ttl, self.token, self.etag, self.record = out, ttl, token, etag, record
        self.path = out.join(LEASE_FILE).path
        self.store = store_for(out.fs)
        self.lost: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew_loop, name="ftl-lease", daemon=True)
        self.thread.start()

    @property
    def fence(self) -> Fence:
        return Fence(self.out, self.token)

    def _renew_loop(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as e:  # a flaky store: keep trying until the lease would expire
                if time.time() > self.record["expires"]:
                    self.lost = f"could not renew before it expired: {e}"
                    return

    def renew(self) -> None:
        record = {**self.record, "renewed": time.time(), "expires": time.time() + self.ttl}
        etag = self.store.replace(self.path, encode(record), expected=self.etag)
        if etag is None:
            self.lost = "another run replaced it"
            self.stop.set()
            return
        self.etag, self.record = etag, record

    def check(self) -> None:
        """Raise if the lease was lost; the driver calls this before and after the work it guards."""
        if self.lost:
            raise LeaseLost(f"lost the lease on {self.out.uri}: {self.lost}. Nothing more was committed by this "
                            f"run; rerun it once the other run is done.")

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if not self.lost:
            self.store.delete(self.path, expected=self.etag)


def encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def try_take(out: storage.Location, *, ttl: float) -> tuple[Lease | None, dict | None]:
    """Take the lease if it is free or expired: (lease, None); else (None, the holder's record)."""
    store, path = store_for(out.fs), out.join(LEASE_FILE).path
    now = time.time()
    record = {"holder": holder(), "since": now, "renewed": now, "expires": now + ttl, "token": uuid.uuid4().hex}
    etag = store.create(path, encode(record))
    if etag is not None:
        return Lease(out, ttl=ttl, token=record["token"], etag=etag, record=record), None
    found = store.read(path)
    if found is None:  # released between our create and our read: try again
        return None, {}
    data, current = found
    try:
        existing = json.loads(data)
    except ValueError:  # a half-written lease from a crashed writer: treat as expired
        existing = {"expires": 0}
    if existing.get("expires", 0) > now:
        return None, existing
    etag = store.replace(path, encode(record), expected=current)
    if etag is None:  # another run took it over first
        return None, {}
    return Lease(out, ttl=ttl, token=record["token"], etag=etag, record=record), None


@contextlib.contextmanager
def hold(out: storage.Location, *, ttl: float = 60.0, wait: float = 0.0, what: str = "run"):
    """Hold the output's lease for the duration of the block; fail at once (or after `wait` s) if held."""
    out.fs.makedirs(out.path, exist_ok=True)
    deadline = time.time() + wait
    while True:
        lease, other = try_take(out, ttl=ttl)
        if lease is not None:
            break
        if time.time() >= deadline and other:
            raise LeaseHeld(
                f"{out.uri} is being written by another {what}: {describe(other)}. Wait for it to finish, or "
                f"set storage.lease_wait=<seconds> to wait for it; a run that died frees its lease after "
                f"storage.lease_ttl ({ttl:.0f}s)."
            )
        time.sleep(min(1.0, max(0.05, ttl / 10)))
    try:
        yield lease
        lease.check()
    finally:
        lease.release()
