"""Exactly once, whatever happens: duplicate URIs, two runs at once, a retried write, a damaged `_ftl.json`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import s3fs

from ftl import config
from ftl.cli import main
from ftl.config import SourceConfig
from ftl.extract import stage as extract
from ftl.io import storage, table
from ftl.sources import listing
from tests.conftest import BUCKET, write_workflow
from tests.support.invariant import assert_exactly_once

EXTRACT = {"weights": "random", "batch_size": 16, "decode_batch_size": 16, "rows_per_file": 16}


def images(fmnist, n: int) -> list[str]:
    return sorted(str(p) for p in fmnist.rglob("*.png"))[:n]


def source_and_output(fmnist, tmp_path, where: str, name: str, n: int) -> tuple[str, str]:
    """The first n images as a source, locally or copied to the S3 server, and an output beside them."""
    if where == "local":
        return str(fmnist), str(tmp_path / "out")
    fs = s3fs.S3FileSystem()
    for u in images(fmnist, n):
        fs.put_file(u, f"{BUCKET}/{name}/{os.path.relpath(u, fmnist)}")
    return f"s3://{BUCKET}/{name}", f"s3://{BUCKET}/{name}-out"


def test_a_manifest_naming_an_image_twice_extracts_it_once(tmp_path, fmnist, ray_runtime, capsys):
    uris = images(fmnist, 20)
    manifest = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": uris + uris[:5] + uris[3:4]}), manifest)
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(manifest), "format": "manifest"},
                        extract={"output": str(tmp_path / "out"), **EXTRACT})
    for i in range(3):
        assert main(["extract", str(wf)]) == 0
        out = capsys.readouterr().out
        assert "duplicates in the listing: 6 (listed once)" in out
        assert f"listed 20 = {20 if i else 0} already done + {0 if i else 20} extracted" in out
        assert assert_exactly_once(str(tmp_path / "out"), listed=uris, not_done=0)["features"] == 20


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_at_once_one_writes_the_other_is_refused(tmp_path, fmnist, s3_server, ray_runtime, where):
    source, out = source_and_output(fmnist, tmp_path, where, "twice", 48)
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": source, "limit": 48},
                        extract={"output": out, **EXTRACT}, storage={"lease_ttl": 10})
    # Started together, as a nightly run and a manual rerun would: the first to take the lease writes.
    procs = [subprocess.Popen([sys.executable, "-m", "ftl.cli", "extract", str(wf)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p.pid, p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(code for _, code, _, _ in done) == [0, 2], done
    (winner, *_), (_, _, _, refused) = sorted(done, key=lambda d: d[1])
    assert f"is being written by another extraction: host {os.uname().nodename}, pid {winner}" in refused
    listed = listing.list_images(SourceConfig(uri=source, limit=48))["uri"].to_pylist()
    assert assert_exactly_once(out, listed=listed, not_done=0)["features"] == 48
    # Told to wait, a second run waits for the first and then finds nothing left to do.
    again = write_workflow(tmp_path / "again.yaml", source={"uri": source, "limit": 48},
                           extract={"output": out, **EXTRACT}, storage={"lease_wait": 60})
    assert extract.run(config.load_workflow(again)).already_done == 48


def test_a_write_task_that_ray_retries_after_committing_adds_no_row(tmp_path, fmnist, ray_runtime):
    """The write task's worker dies right after its commit: Ray runs the task again, which commits the same part."""
    from ftl.io.sink import SplitSink

    marker = tmp_path / "died-once"

    class DiesAfterCommit(SplitSink):
        def write(self, blocks, ctx):
            counts = super().write(blocks, ctx)
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker dies: no result reaches Ray, as after a node loss
            return counts

    wf = config.load_workflow(write_workflow(tmp_path / "wf.yaml", source={"uri": str(fmnist), "limit": 40},
                                             extract={"output": str(tmp_path / "out"), **EXTRACT,
                                                      "rows_per_file": 1000}))
    spec, prov = extract.model_spec(wf)
    out = storage.locate(wf.extract.output)
    listed = extract.list_source(wf)
    original = extract.feature_sink
    extract.feature_sink = lambda out, prov, *, rows_per_file, fence: DiesAfterCommit(
        out, folder="features", schema=extract.schema.features(prov), rows_per_file=1000, fence=fence)
    schemas = {"features": extract.schema.features(prov), "quarantine": extract.schema.QUARANTINE}
    try:
        with extract.output.writing(out, identity=prov.to_dict(), key="feature_set", storage_cfg=wf.storage,
                                    what="extraction", mismatch=extract.mismatch, schemas=schemas,
                                    description=prov.to_dict()) as held:
            counts = extract.extract_into(out, wf, spec, prov, listed, fence=held.fence)
    finally:
        extract.feature_sink = original
    assert marker.exists()  # it did die after committing, and was run again
    assert counts["ok"] == 40
    assert assert_exactly_once(out.uri, listed=listed[0]["uri"].to_pylist(), not_done=0)["features"] == 40


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_writer_stalled_between_its_check_and_its_commit_commits_nothing_after_a_takeover(
        tmp_path, fmnist, s3_server, ray_runtime, where):
    """A run's write task is held (by the test hook) after its last check; its driver is frozen, so its
    lease goes unrenewed; a second run takes over and commits everything. The first commit is refused."""
    source, out = source_and_output(fmnist, tmp_path, where, "stall", 24)
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": source, "limit": 24},
                        extract={"output": out, **EXTRACT, "rows_per_file": 1000}, storage={"lease_ttl": 4})
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-m", "ftl.cli", "extract", str(wf)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, table.HOLD_ENV: str(go)})
    try:
        deadline = time.monotonic() + 600
        while not os.path.exists(f"{go}.reached"):
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()  # before reading its streams: a run held at its commit never closes them
                out_text, err = first.communicate()
                pytest.fail(f"never reached its commit: exit {first.returncode}\n{out_text}\n{err}", pytrace=False)
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)  # frozen, as a VM or a GC pause would freeze it
        # Told to wait, it watches the unrenewed lease for a ttl, then takes over.
        second = extract.run(config.load_workflow(wf, ["storage.lease_wait=60"]))
        assert second.ok == 24
        go.touch()  # the first run's write task goes on with its commit, from its old snapshot
        time.sleep(3)
    except BaseException:
        first.kill()  # a failed test leaves no frozen run behind
        raise
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code = first.wait(timeout=120)
    out_text, err = first.communicate()
    # The guarantee first: whatever the first run's end, it committed nothing after the takeover.
    features = table.Table.at(storage.locate(out).join("features"))
    first_epoch = features.epoch() - 1  # the second run fenced the table with the next epoch
    assert table.committed_by(features, first_epoch) == 0
    listed = listing.list_images(SourceConfig(uri=source, limit=24))["uri"].to_pylist()
    assert assert_exactly_once(out, listed=listed, not_done=0)["features"] == 24
    if code == 0 and not out_text and "Ray Data or Ray Core internal code" in err:
        # Seen twice under CI load, never reproduced here: the resumed driver ends with status 0 and
        # no summary after Ray Data reports the interrupt as an internal error. Its data is right
        # (asserted above); the exit is not, and this marks it as known rather than passing it.
        pytest.xfail(f"a resumed driver ended with status 0 and no summary:\n{err[-3000:]}")
    # Both streams on failure: a run that ended otherwise says on stdout what it believed it committed.
    if not (code == 2 and "lost the lease" in err and "Traceback" not in err):
        pytest.fail(f"exit {code}\n--- stdout\n{out_text}\n--- stderr\n{err}", pytrace=False)  # untruncated


def test_a_damaged_identity_file_is_rebuilt_from_the_parts(tmp_path, fmnist, ray_runtime):
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(fmnist), "limit": 20},
                        extract={"output": str(tmp_path / "out"), **EXTRACT})
    first = extract.run(config.load_workflow(wf))
    identity = tmp_path / "out" / "_ftl.json"
    identity.write_text(identity.read_text()[:40])  # cut short, as by a crash mid-write of an older ftl
    again = extract.run(config.load_workflow(wf))
    assert again.already_done == 20 and json.loads(identity.read_text())["feature_set"] == first.feature_set
    other = write_workflow(tmp_path / "other.yaml", source={"uri": str(fmnist), "limit": 20},
                           extract={"output": str(tmp_path / "out"), **EXTRACT, "pooling": "max"})
    with pytest.raises(extract.ExtractError, match="differs in: layers"):
        extract.run(config.load_workflow(other))
    assert_exactly_once(str(tmp_path / "out"), not_done=None)
