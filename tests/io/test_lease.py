"""One writer per output: the lease, between real processes, on local disk and on the S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from ftl.io import lease, storage
from tests.conftest import BUCKET

HOLD = """
import sys, time
from ftl.io import lease, storage
out = storage.locate(sys.argv[1])
with lease.hold(out, ttl=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
print("released", flush=True)
"""

TAKE = """
import sys, time
from ftl.io import lease, storage
out = storage.locate(sys.argv[1])
taker = lease.Taker(out, ttl=2)
assert taker.attempt()[0] is None  # the first sight of the stale lease starts this host's watch
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all takers try together, each past its own ttl
got, _ = taker.attempt()
print("won" if got else "lost", flush=True)
if got:
    got.stop.set()
"""


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://{BUCKET}/lease-{time.time_ns()}"
    return str(tmp_path / "out")


def holder_process(uri: str, *, ttl: float, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(ttl), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_fails_at_once_naming_the_holder_and_takes_over_when_it_dies(output):
    proc = holder_process(output, ttl=3, seconds=120)
    try:
        started = time.monotonic()
        with pytest.raises(lease.LeaseHeld, match=rf"another run: host \S+, pid {proc.pid} since .*lease_wait"):
            with lease.hold(storage.locate(output), ttl=3):
                pass
        assert time.monotonic() - started < 2  # at once, not after a wait
    finally:
        proc.kill()  # SIGKILL: no release, the lease must expire by itself
        proc.wait()
    died = time.monotonic()
    with lease.hold(storage.locate(output), ttl=3, wait=30) as held:
        recovered = time.monotonic() - died
        assert held.record["holder"]["pid"] != proc.pid
    assert 0 < recovered < 3 + 2, recovered  # within the time to live, plus one poll


def test_a_waiting_writer_gets_the_lease_when_the_holder_finishes(output):
    proc = holder_process(output, ttl=30, seconds=2)
    with lease.hold(storage.locate(output), ttl=30, wait=60):
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read().strip() == "released"
    # Released on exit: the next run takes it at once.
    with lease.hold(storage.locate(output), ttl=30):
        pass


def test_renewal_keeps_a_long_run_s_lease(output):
    out = storage.locate(output)
    with lease.hold(out, ttl=1.5) as held:
        time.sleep(4)  # past two times the time to live: only renewals keep it
        with pytest.raises(lease.LeaseHeld):
            with lease.hold(out, ttl=1.5):
                pass
        held.check()
        assert held.lost is None


def test_of_many_runs_taking_over_an_expired_lease_one_wins(output):
    out = storage.locate(output)
    out.fs.makedirs(out.path, exist_ok=True)
    stale = {"holder": {"host": "gone", "pid": 1}, "since": 0, "renewed": 0, "epoch": 4, "token": "old"}
    out.fs.pipe_file(out.join(lease.LEASE_FILE).path, json.dumps(stale).encode())
    start = time.time() + 8  # past every taker's start-up plus its ttl of watching
    procs = [subprocess.Popen([sys.executable, "-c", TAKE, output, str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["lost", "lost", "lost", "won"]
    record = json.loads(out.fs.cat_file(out.join(lease.LEASE_FILE).path))
    assert record["token"] != "old" and record["epoch"] == 5  # a takeover is the next epoch


def test_a_taker_whose_clock_runs_a_ttl_ahead_does_not_take_a_live_lease(output, monkeypatch):
    """Expiry is judged on the taker's own monotonic clock: the record unchanged for a ttl, as it watched it."""
    ttl = 3
    proc = holder_process(output, ttl=ttl, seconds=60)
    try:
        real = time.time
        monkeypatch.setattr(lease.time, "time", lambda: real() + ttl * 2)  # the holder's record looks stale here
        started = time.monotonic()
        with pytest.raises(lease.LeaseHeld, match=rf"pid {proc.pid}"):
            with lease.hold(storage.locate(output), ttl=ttl):
                pass
        waited = time.monotonic() - started
        monkeypatch.undo()
        # It watched for one ttl (the lease looked abandoned by its clock), saw renewals, and gave up.
        assert ttl <= waited < ttl + 3, waited
        record = json.loads(storage.locate(output).fs.cat_file(storage.locate(output).join(lease.LEASE_FILE).path))
        assert record["holder"]["pid"] == proc.pid and "released" not in record
    finally:
        proc.kill()
        proc.wait()


def test_release_after_a_takeover_leaves_the_successor_s_lease(output):
    out = storage.locate(output)
    with lease.hold(out, ttl=30) as first:
        first.stop.set()  # frozen: no more renewals
        first.thread.join()
        taker = lease.Taker(out, ttl=0.2)
        taker.attempt()
        time.sleep(0.3)
        second, _ = taker.attempt()
        assert second is not None and second.epoch == first.epoch + 1
    # `first` released on leaving the block: a swap on its own ETag, refused, so the successor still holds it.
    record = json.loads(out.fs.cat_file(out.join(lease.LEASE_FILE).path))
    assert record["token"] == second.record["token"] and "released" not in record
    second.release()
    assert "released" in json.loads(out.fs.cat_file(out.join(lease.LEASE_FILE).path))
    with lease.hold(out, ttl=30) as third:  # a released lease is taken at once, as the next epoch
        assert third.epoch == second.epoch + 1


def test_only_a_failed_precondition_counts_as_one():
    import errno

    from botocore.exceptions import ClientError

    from ftl.io.lease_store import precondition_failed

    assert not precondition_failed(OSError(errno.EINVAL, "Invalid argument"))  # e.g. a bad request: raised
    for code, status in (("PreconditionFailed", 412), ("InvalidArgument", 400)):
        e = OSError(errno.EINVAL, code)
        e.__cause__ = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        assert precondition_failed(e) is (status == 412)
    assert precondition_failed(FileExistsError("exists"))


def test_a_swap_against_a_stale_etag_is_refused(output):
    """The compare-and-swap itself: whoever read the expired lease before another run replaced it loses."""
    from ftl.io.lease_store import store_for

    out = storage.locate(output)
    out.fs.makedirs(out.path, exist_ok=True)
    store, path = store_for(out.fs), out.join(lease.LEASE_FILE).path
    first = store.create(path, b'{"token": "a"}')
    assert first and store.create(path, b'{"token": "b"}') is None  # create-if-absent
    second = store.replace(path, b'{"token": "b"}', expected=first)
    assert second and store.replace(path, b'{"token": "c"}', expected=first) is None
    assert store.read(path)[0] == b'{"token": "b"}'
    store.delete(path, expected=first)  # not ours any more: left alone
    assert store.read(path) is not None
    store.delete(path, expected=second)
    assert store.read(path) is None


def test_ray_s_log_of_a_write_task_refused_by_the_fence_is_dropped_and_others_kept():
    """ftl says in one line that a newer run took over; Ray's traceback of the refused task would bury it."""
    import logging

    from ray.exceptions import RayTaskError

    from ftl import logs

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("ray.data", logging.ERROR, __file__, 1, "An exception was raised from a task of "
                                 "operator \"Write\".", None, (type(exc), exc, None))

    refused = RayTaskError("Write", "Traceback ...", lease.LeaseLost("fenced by a newer run")).as_instanceof_cause()
    assert isinstance(refused, lease.LeaseLost)
    drop = logs._Drop()
    assert not drop.filter(record(refused))
    assert drop.filter(record(RayTaskError("Write", "Traceback ...", OSError("disk full")).as_instanceof_cause()))
