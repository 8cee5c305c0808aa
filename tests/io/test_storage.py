"""Storage on fsspec's own URL handling: any fsspec filesystem works where a path is expected."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ftl.config import SourceConfig
from ftl.errors import StorageError
from ftl.io import storage
from ftl.sources import listing


def test_local_paths_and_file_uris_are_one_location(tmp_path):
    a, b = storage.locate(str(tmp_path / "x")), storage.locate(f"file://{tmp_path}/x")
    assert a.path == b.path == str(tmp_path / "x") and a.uri == str(tmp_path / "x") and a.is_local
    assert storage.locate(str(tmp_path)).join("x", "y").uri == str(tmp_path / "x" / "y")


def test_s3_uris_round_trip(s3_server):
    loc = storage.locate("s3://bucket/some/prefix/")
    assert (loc.path, loc.uri, loc.is_local) == ("bucket/some/prefix", "s3://bucket/some/prefix", False)
    assert storage.locate("s3a://bucket/k").uri == "s3://bucket/k"


def test_any_fsspec_filesystem_holds_parts_and_listings(fmnist):
    """memory:// stands in for any store fsspec knows: staged files and an imagefolder listing work on it."""
    out = storage.locate("memory://ftl-test/out")
    staged = storage.stage_table(pa.table({"a": [1, 2]}), out)
    assert out.to_uri(staged).startswith("memory:///ftl-test/out/_staging/") and out.fs.exists(staged)

    src = storage.locate("memory://ftl-test/images")
    for path in sorted((fmnist / "train" / "bag").iterdir())[:3]:
        src.fs.pipe(src.join("train", "bag", path.name).path, path.read_bytes())
    table = listing.list_images(SourceConfig(uri="memory://ftl-test/images"))
    assert table.num_rows == 3 and set(table["label"].to_pylist()) == {"bag"}
    assert all(u.startswith("memory:///ftl-test/images/train/bag/") for u in table["uri"].to_pylist())


def test_unknown_or_uninstalled_filesystems_say_what_to_do():
    with pytest.raises(StorageError, match="Protocol not known: nope.*s3://, gs://"):
        storage.locate("nope://bucket/key")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match="gcsfs"):
            storage.locate("gs://bucket/key")
