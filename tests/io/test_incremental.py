"""Incremental and resumable extraction: only what is new, changed or unfinished is extracted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import s3fs
from PIL import Image

from ftl import config
from ftl.config import SourceConfig
from ftl.extract import stage as extract
from ftl.sources import listing
from tests.conftest import BUCKET, write_workflow
from tests.support import tables
from tests.support.invariant import assert_exactly_once
from tests.support.sessions import end_session


def run(wf):
    return extract.run(config.load_workflow(wf))


def counts(result):
    return result.listed, result.already_done, result.ok, result.quarantined


def copy_images(src, dst, n, *, start=0):
    files = sorted(src.rglob("*.png"))[start : start + n]
    for p in files:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    return files


def rows(out) -> pd.DataFrame:
    return tables.frame(out)


@pytest.mark.parametrize("how", ["driver", "distributed"])
def test_new_changed_and_removed_images_locally(tmp_path, fmnist, ray_runtime, how):
    """The same run, listed and diffed on the driver or by Ray tasks and joins: the same counts and rows."""
    data = tmp_path / "data"
    copy_images(fmnist, data, 30)
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(data), "listing": how},
                        extract={"output": str(tmp_path / "out"), "weights": "random"})
    assert counts(run(wf)) == (30, 0, 30, 0)
    assert counts(run(wf)) == (30, 30, 0, 0)  # nothing new: no backbone work at all

    copy_images(fmnist, data, 10, start=100)
    assert counts(run(wf)) == (40, 30, 10, 0)  # only the new ones

    changed = sorted(data.rglob("*.png"))[3]
    before = rows(tmp_path / "out" / "features").set_index("uri").loc[str(changed)]
    Image.new("L", (28, 28), 255).save(changed)  # a different image under the same name
    os.utime(changed, (time.time() + 5, time.time() + 5))
    result = run(wf)
    assert counts(result) == (40, 39, 1, 0) and result.superseded == 1
    after = rows(tmp_path / "out" / "features")
    assert after["uri"].is_unique and len(after) == 40
    row = after.set_index("uri").loc[str(changed)]
    assert row["image_id"] != before["image_id"]
    assert not np.allclose(row["feat_flatten"], before["feat_flatten"], rtol=1e-2, atol=0)

    removed = sorted(data.rglob("*.png"))[0]
    removed.unlink()
    result = run(wf)
    assert counts(result) == (39, 39, 0, 0) and result.gone == 1
    assert "gone from the source: 1" in result.summary()
    assert len(rows(tmp_path / "out" / "features")) == 40  # reported, not deleted
    assert_exactly_once(str(tmp_path / "out"))


@pytest.mark.parametrize("how", ["driver", "distributed"])
def test_new_and_changed_images_on_s3(tmp_path, fmnist, s3_server, ray_runtime, how):
    fs = s3fs.S3FileSystem()
    files = sorted(fmnist.rglob("*.png"))
    for p in files[:20]:
        fs.put_file(str(p), f"{BUCKET}/incr-{how}/{p.relative_to(fmnist)}")
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": f"s3://{BUCKET}/incr-{how}", "listing": how},
                        extract={"output": f"s3://{BUCKET}/incr-{how}-out", "weights": "random"})
    src, out = f"{BUCKET}/incr-{how}", f"s3://{BUCKET}/incr-{how}-out"
    assert counts(run(wf)) == (20, 0, 20, 0)
    for p in files[20:25]:
        fs.put_file(str(p), f"{src}/{p.relative_to(fmnist)}")
    assert counts(run(wf)) == (25, 20, 5, 0)
    fs.put_file(str(files[30]), f"{src}/{files[0].relative_to(fmnist)}")  # new content, new ETag
    result = run(wf)
    assert counts(result) == (25, 24, 1, 0) and result.superseded == 1
    table = tables.frame(f"{out}/features")
    assert len(table) == 25 and table["uri"].is_unique
    assert_exactly_once(out, listed=[f"s3://{src}/{p.relative_to(fmnist)}" for p in files[:25]], not_done=0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_run_resumes_to_exactly_once(tmp_path, fmnist, s3_server, ray_runtime, where):
    limit = 240 if where == "local" else 120
    source, out = str(fmnist), str(tmp_path / "out")
    if where == "s3":
        fs = s3fs.S3FileSystem()
        for p in sorted(fmnist.rglob("*.png"))[:limit]:
            fs.put_file(str(p), f"{BUCKET}/kill/{p.relative_to(fmnist)}")
        source, out = f"s3://{BUCKET}/kill", f"s3://{BUCKET}/kill-out"
    # The killed run's lease lives on until it expires: the rerun waits that long, not more.
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": source, "limit": limit},
                        extract={"output": out, "weights": "random", "batch_size": 16,
                                 "decode_batch_size": 16, "rows_per_file": 16},
                        storage={"lease_ttl": 5, "lease_wait": 60})
    proc = subprocess.Popen([sys.executable, "-m", "ftl.cli", "extract", str(wf)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # inherits the S3 env
    deadline = time.time() + 240
    while time.time() < deadline and committed_parts(f"{out}/features") < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    # The driver and every process of the Ray runtime it started, workers included (they run in
    # groups of their own): a write task still running would commit its part after the count below.
    end_session(proc, signal.SIGKILL)
    written = len(rows(f"{out}/features"))
    assert 0 < written < limit

    resumed = run(wf)
    assert resumed.already_done == written and resumed.ok == limit - written
    clean = write_workflow(tmp_path / "clean.yaml", source={"uri": source, "limit": limit},
                           extract={"output": str(tmp_path / "clean"), "weights": "random"})
    run(clean)
    assert_exactly_once(out, listed=listing.list_images(SourceConfig(uri=source, limit=limit))["uri"].to_pylist(),
                        not_done=0)
    got = rows(f"{out}/features").set_index("image_id").sort_index()
    want = rows(tmp_path / "clean" / "features").set_index("image_id").sort_index()
    assert got.index.is_unique and list(got.index) == list(want.index)
    np.testing.assert_allclose(np.stack(got["feat_flatten"]), np.stack(want["feat_flatten"]), rtol=1e-4, atol=1e-5)


def committed_parts(folder: str) -> int:
    """Data files the table's log names: commits a killed run kept."""
    from ftl.io import storage, table

    t = table.Table.at(storage.locate(folder))
    return len(t.open().file_uris()) if t.exists() else 0
