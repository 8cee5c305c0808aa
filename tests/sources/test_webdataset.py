"""WebDataset shards as a source: read by Ray Data's reader, locally and from S3, incrementally."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time

import pytest
import s3fs

from ftl import config
from ftl.extract import stage as extract
from tests.conftest import BUCKET, write_workflow
from tests.support import tables
from tests.support.invariant import assert_exactly_once


def write_shard(path, images, *, broken: bool = False) -> None:
    """img2dataset's layout: <key>.png and <key>.cls members, one sample per key."""
    with tarfile.open(path, "w") as tar:
        for p in images:
            key = p.stem
            for ext, data in (("png", p.read_bytes()), ("cls", p.parent.name.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if broken:
            info = tarfile.TarInfo("broken.png")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"nope!"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_shards_incrementally(tmp_path, fmnist, s3_server, ray_runtime, where):
    files = sorted(fmnist.glob("train/*/*.png"))
    shards = tmp_path / "shards" / "train"
    shards.mkdir(parents=True)
    write_shard(shards / "shard-00000.tar", files[:12])
    write_shard(shards / "shard-00001.tar", files[12:20], broken=True)
    root, out = str(tmp_path / "shards"), str(tmp_path / "out")
    if where == "s3":
        fs = s3fs.S3FileSystem()
        fs.put(str(tmp_path / "shards"), f"{BUCKET}/wds", recursive=True)
        root, out = f"s3://{BUCKET}/wds", f"s3://{BUCKET}/wds-out"
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": root, "format": "webdataset"},
                        extract={"output": out, "weights": "random", "max_error_fraction": 0.1})
    result = extract.run(config.load_workflow(wf))
    assert (result.listed, result.already_done, result.ok, result.quarantined) == (21, 0, 20, 1)

    feats = tables.frame(f"{out}/features")
    assert len(feats) == 20 and feats["image_id"].is_unique
    assert sorted(feats["uri"].str.split("#").str[1]) == sorted(p.stem for p in files[:20])
    label_of = {p.stem: p.parent.name for p in files}
    assert (feats["label"] == feats["uri"].str.split("#").str[1].map(label_of)).all()
    assert set(feats["split"]) == {"train"}
    quarantine = tables.frame(f"{out}/quarantine")
    assert list(quarantine["uri"].str.split("#").str[1]) == ["broken"]

    # A new shard: the finished ones are not even opened, only the new images are extracted.
    write_shard(tmp_path / "shard-00002.tar", files[20:26])
    if where == "s3":
        s3fs.S3FileSystem().put_file(str(tmp_path / "shard-00002.tar"), f"{BUCKET}/wds/train/shard-00002.tar")
    else:
        (tmp_path / "shard-00002.tar").rename(shards / "shard-00002.tar")
    again = extract.run(config.load_workflow(wf))
    assert (again.shards_skipped, again.listed, again.ok, again.quarantined) == (2, 6, 6, 0)
    assert len(tables.frame(f"{out}/features")) == 26
    assert extract.run(config.load_workflow(wf)).shards_skipped == 3


def test_images_done_inside_an_unfinished_shard_are_skipped(tmp_path, fmnist, ray_runtime):
    files = sorted(fmnist.glob("val/*/*.png"))[:10]
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "s.tar", files)
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(tmp_path / "shards"), "format": "webdataset"},
                        extract={"output": str(tmp_path / "out"), "weights": "random"})
    assert extract.run(config.load_workflow(wf)).ok == 10
    (tmp_path / "out" / "_shards.parquet").unlink()  # as if the run died before recording the shard
    again = extract.run(config.load_workflow(wf))
    assert (again.listed, again.already_done, again.ok) == (10, 10, 0)
    assert tables.read(tmp_path / "out" / "features").num_rows == 10


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_changed_shard_supersedes_its_rows(tmp_path, fmnist, s3_server, ray_runtime, where):
    files = sorted(fmnist.glob("test/*/*.png"))
    local = tmp_path / "shards"
    local.mkdir()
    write_shard(local / "a.tar", files[:8])
    write_shard(local / "b.tar", files[8:12])
    root, out = str(local), str(tmp_path / "out")
    if where == "s3":
        root, out = f"s3://{BUCKET}/wds-change", f"s3://{BUCKET}/wds-change-out"
        s3fs.S3FileSystem().put(str(local), f"{BUCKET}/wds-change", recursive=True)
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": root, "format": "webdataset"},
                        extract={"output": out, "weights": "random"})
    assert extract.run(config.load_workflow(wf)).ok == 12
    # a.tar is rewritten: two samples gone, one changed, two new; re-uploaded to S3 with a new ETag.
    write_shard(local / "a.tar", files[2:7] + files[20:22])
    os.utime(local / "a.tar", (time.time() + 5, time.time() + 5))
    if where == "s3":
        s3fs.S3FileSystem().put_file(str(local / "a.tar"), f"{BUCKET}/wds-change/a.tar")
    again = extract.run(config.load_workflow(wf))
    assert (again.shards_skipped, again.superseded, again.ok) == (1, 8, 7)
    uris = [f"{root}/a.tar#{p.stem}" for p in files[2:7] + files[20:22]] + [f"{root}/b.tar#{p.stem}" for p in files[8:12]]
    assert assert_exactly_once(out, listed=uris, not_done=0)["features"] == 11


def test_only_wanted_members_are_read_and_a_bad_label_quarantines_its_sample(tmp_path, fmnist, ray_runtime):
    files = sorted(fmnist.glob("train/*/*.png"))[:4]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "s.tar", "w") as tar:
        for i, p in enumerate(files):
            members = [("png", p.read_bytes()), ("cls", b"\xff\xfe" if i == 1 else p.parent.name.encode()),
                       ("npy", b"\0" * 4_000_000)]  # big members the run has no use for
            for ext, data in members:
                info = tarfile.TarInfo(f"{p.stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    from ftl.sources import webdataset

    with tarfile.open(tmp_path / "shards" / "s.tar") as tar, CountingReads.patch(tar) as reads:
        got = list(webdataset.samples(tar, {"png", "cls"}))
    assert [sorted(m) for _, m, _ in got] == [["cls", "png"]] * 4
    assert reads.largest < 1_000_000  # the 4 MB .npy members were seeked over, never read
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(tmp_path / "shards"), "format": "webdataset"},
                        extract={"output": str(tmp_path / "out"), "weights": "random", "max_error_fraction": 0.5})
    result = extract.run(config.load_workflow(wf))
    assert (result.ok, result.quarantined) == (3, 1)
    q = tables.frame(tmp_path / "out" / "quarantine")
    assert q["error"].str.contains("label member .cls is not UTF-8").all()
    assert_exactly_once(str(tmp_path / "out"), listed=[f"{tmp_path / 'shards'}/s.tar#{p.stem}" for p in files])


class CountingReads:
    """Wraps a tar's file object to record the size of every read."""

    def __init__(self, f):
        self.f, self.largest = f, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.largest = max(self.largest, len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    @classmethod
    @contextlib.contextmanager
    def patch(cls, tar):
        counting = cls(tar.fileobj)
        tar.fileobj = counting
        yield counting


def test_oversized_members_and_repeated_keys_are_quarantined_once_each(tmp_path, fmnist, ray_runtime):
    """The byte cap holds for shard members (by their headers, before any read), and a key whose members are
    not adjacent gives two samples with two ids, never one id in features and in quarantine."""
    files = sorted(fmnist.rglob("*.png"))[:3]
    big = b"\x89PNG" + b"\0" * 3_000_000
    order = [("a.png", files[0].read_bytes()), ("b.png", files[1].read_bytes()), ("a.cls", b"shirt"),
             ("huge.png", big), ("c.png", files[2].read_bytes()), ("c.cls", b"bag")]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "s.tar", "w") as tar:
        for name, data in order:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    from ftl.sources import webdataset

    with tarfile.open(tmp_path / "shards" / "s.tar") as tar, CountingReads.patch(tar) as reads:
        got = list(webdataset.samples(tar, {"png", "cls"}, max_bytes=1_000_000))
    assert reads.largest < 1_000_000  # the 3 MB member was refused by its header, never read
    assert [(k.split("@")[0], sorted(m), r) for k, m, r in got] == [
        ("a", ["png"], False), ("b", ["png"], False), ("a", ["cls"], True), ("huge", ["png"], False),
        ("c", ["cls", "png"], False)]
    wf = write_workflow(tmp_path / "wf.yaml", source={"uri": str(tmp_path / "shards"), "format": "webdataset"},
                        extract={"output": str(tmp_path / "out"), "weights": "random", "max_error_fraction": 0.9,
                                 "max_image_bytes": 1_000_000})
    result = extract.run(config.load_workflow(wf))
    assert (result.ok, result.quarantined) == (3, 2)
    q = tables.frame(tmp_path / "out" / "quarantine").set_index("uri")["error"]
    shard = f"{tmp_path / 'shards'}/s.tar"
    assert "3000004 bytes exceeds extract.max_image_bytes=1000000" in q[f"{shard}#huge"]
    [repeat] = [u for u in q.index if u.startswith(f"{shard}#a@")]
    assert "members must be adjacent" in q[repeat]
    f = tables.frame(tmp_path / "out" / "features")
    assert len(set(f["image_id"]) | set(tables.frame(tmp_path / "out" / "quarantine")["image_id"])) == 5
