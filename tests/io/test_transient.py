"""Errors that heal: passing read failures are retried in the run, then left for the next run; lasting
ones are quarantined; an object over the size cap is refused from the listing, never read.

A unit test on a filesystem that fails on purpose; the real S3 server going away mid-run is in
the fault tests.
"""

from __future__ import annotations

import errno
from collections import Counter

import pyarrow as pa
import pytest
import s3fs.errors
from fsspec.implementations.memory import MemoryFileSystem
from PIL import UnidentifiedImageError

from ftl.io import retry, schema
from ftl.io.lease import LeaseLost
from ftl.model import imaging
from ftl.pipeline import readers
from tests.support import tables


class FlakyFS(MemoryFileSystem):
    """Fails reads of a path as many times as `failures` says, with the error it names."""

    protocol = "flaky"
    store, pseudo_dirs = {}, [""]
    failures: dict[str, tuple[int, BaseException]] = {}
    reads: Counter = Counter()

    @classmethod
    def _strip_protocol(cls, path):  # as every fsspec filesystem does with its own protocol
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        self.reads[path] += 1
        left, error = self.failures.get(path, (0, None))
        if left:
            self.failures[path] = (left - 1, error)
            raise error
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture
def flaky(fmnist, monkeypatch):
    import fsspec

    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(retry, "backoff", lambda attempt: 0.0)  # the schedule is not under test
    FlakyFS.store.clear()
    FlakyFS.reads.clear()
    png = next((fmnist / "train" / "bag").iterdir()).read_bytes()
    for name in ("heals", "stays-down", "big", "ok"):
        FlakyFS().pipe_file(f"/{name}.png", png)
    FlakyFS.failures = {"/heals.png": (2, TimeoutError("read timed out")),
                        "/stays-down.png": (99, OSError(errno.ECONNRESET, "Connection reset by peer"))}
    return png


@pytest.mark.parametrize("error, transient", [
    (TimeoutError("timed out"), True), (ConnectionResetError(), True), (PermissionError("AccessDenied"), True),
    (OSError(errno.EREMOTEIO, "Internal Server Error"), True), (OSError("503 SlowDown: please reduce"), True),
    (type("ReadTimeoutError", (Exception,), {})("botocore read timeout"), True),
    (FileNotFoundError("gone"), False), (ValueError("empty file (0 bytes)"), False),
    (UnidentifiedImageError("cannot identify image file"), False), (imaging.TooLarge("too many pixels"), False),
])
def test_errors_are_sorted_into_passing_and_lasting(error, transient):
    assert retry.is_transient(error) is transient


def client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("error, transient", [
    # Words in a URI or a name say nothing about the error: its errno, type or code does.
    (OSError(errno.EINVAL, "Invalid argument: s3://b/img_1503.jpg"), False),
    (OSError("Generic S3 error: cannot decode s3://b/timeouts/a.png"), False),
    (LeaseLost("the lease of s3://b/out was taken by pid 25030 (timeout 30 s)"), False),
    # botocore's ClientError and s3fs's translation of it, by code and status.
    (client_error("SlowDown", 503), True), (client_error("NoSuchKey", 404), False),
    (client_error("InvalidObjectName", 400), False),
    (s3fs.errors.translate_boto_error(client_error("SomethingNew", 503)), True),
    (s3fs.errors.translate_boto_error(client_error("NoSuchKey", 404)), False),
    # deltalake's object store says only words; they are read with the URL cut out.
    (OSError("Generic S3 error: error sending request for url (http://127.0.0.1:9/b/_delta_log/1.json): "
             "Connection refused"), True),
])
def test_errors_are_judged_by_their_type_and_code_not_their_words(error, transient):
    assert retry.is_transient(error) is transient


def test_http_statuses_decide():
    from aiohttp import ClientResponseError, RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    info = RequestInfo(URL("http://h/timeouts/503.png"), "GET", CIMultiDictProxy(CIMultiDict()))
    assert retry.is_transient(ClientResponseError(info, (), status=503)) is True
    assert retry.is_transient(ClientResponseError(info, (), status=404, message="timeout")) is False


def test_reads_retry_passing_errors_then_leave_them_for_the_next_run(flaky):
    uris = ["flaky:///heals.png", "flaky:///stays-down.png", "flaky:///missing.png", "flaky:///big.png",
            "flaky:///ok.png"]
    batch = pa.table({"image_id": [f"{i:032x}" for i in range(5)], "uri": uris, "label": ["bag"] * 5,
                      "split": ["train"] * 5, "size": [len(flaky)] * 3 + [10**9, len(flaky)]})
    pre = imaging.Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = readers.decode_batch(batch, pre=pre, max_pixels=10**6, storage_options=None, max_bytes=10**6)
    status = dict(zip(uris, zip(out["stage"].to_pylist(), out["error"].to_pylist())))

    assert status["flaky:///heals.png"] == ("", "")  # failed twice, read on the third try
    assert status["flaky:///ok.png"] == ("", "")
    assert status["flaky:///stays-down.png"][0] == schema.STAGE_RETRY  # not quarantined: the next run retries it
    assert "Connection reset" in status["flaky:///stays-down.png"][1]
    assert status["flaky:///missing.png"][0] == "read"  # lasting: quarantined
    assert status["flaky:///big.png"] == ("read", "TooBig: 1000000000 bytes exceeds extract.max_image_bytes=1000000")
    # Bounded: a read that keeps failing is tried READ_ATTEMPTS times, not forever; the big one never.
    assert FlakyFS.reads["/stays-down.png"] == readers.READ_ATTEMPTS
    assert FlakyFS.reads["/heals.png"] == 3 and FlakyFS.reads["/big.png"] == 0


def test_a_commit_rides_out_a_passing_storage_failure(tmp_path, monkeypatch):
    """The sink's commit fails twice the way an unreachable endpoint does, then lands once, in its table."""
    from ftl.io import sink, storage, table

    monkeypatch.setattr(retry, "backoff", lambda attempt: 0.0)
    real, calls = table.append, Counter()

    def unreachable_twice(target, rows, *, fence):
        calls[target.loc.path] += 1
        if calls[target.loc.path] <= 2:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        return real(target, rows, fence=fence)

    monkeypatch.setattr(table, "append", unreachable_twice)
    out = storage.locate(str(tmp_path / "out"))
    rows_schema = pa.schema([("image_id", pa.string()), ("x", pa.float64())])
    fence = table.Fence(1)
    table.fence(table.Table.at(out.join("features")), schema=rows_schema, description={}, fence=fence)
    cols = {"image_id": ["a", "b"], "uri": ["/a.png", "/b.png"], "error": [schema.ERROR_NONE] * 2,
            "stage": ["", ""], "x": [1.0, 2.0]}
    s = sink.SplitSink(out, folder="features", schema=rows_schema, rows_per_file=2, fence=fence)
    assert s.write([pa.table(cols)], None)["ok"] == 2
    landed = tables.read(tmp_path / "out" / "features")
    assert sorted(landed["image_id"].to_pylist()) == ["a", "b"] and sum(calls.values()) == 3
    # A failure that does not pass is not retried: it fails the task at once.
    calls.clear()

    def mismatch(target, rows, *, fence):
        calls[target.loc.path] += 1
        raise ValueError("schema mismatch")

    monkeypatch.setattr(table, "append", mismatch)
    with pytest.raises(ValueError):
        s.write([pa.table(cols)], None)
    assert sum(calls.values()) == 1
