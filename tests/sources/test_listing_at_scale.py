"""The listing as Ray Data operations gives the driver's rows: parallel folder listing, manifests of many
files (duplicates, versions from columns), `limit`, and an S3 Inventory report on the S3 server."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import s3fs

from ftl import config
from ftl.config import SourceConfig
from ftl.errors import FtlError
from ftl.extract import stage as extract
from ftl.sources import distributed, listing
from tests.conftest import BUCKET, write_workflow
from tests.support.invariant import assert_exactly_once


def rows(scaled: distributed.ScaledListing) -> pa.Table:
    return pa.concat_tables(ray.get(scaled.rows.to_arrow_refs())).sort_by("uri")


def same(a: pa.Table, b: pa.Table) -> bool:
    return a.sort_by("uri").equals(b.sort_by("uri").cast(a.schema))


@pytest.mark.parametrize("limit", [None, 37, 200])
def test_a_parallel_listing_gives_the_driver_s_rows(fmnist, ray_runtime, limit):
    driver = listing.list_images(SourceConfig(uri=str(fmnist), limit=limit))
    scaled = distributed.list_source(SourceConfig(uri=str(fmnist), limit=limit, listing="distributed"), None)
    assert scaled.listed == driver.num_rows and scaled.duplicates == 0
    assert scaled.pieces == 1 + 3 + 30  # the root, its 3 splits, their 10 classes each: a task per folder
    assert same(rows(scaled), driver)


def test_a_parallel_listing_on_s3_gives_the_driver_s_rows(fmnist, s3_server, ray_runtime):
    fs = s3fs.S3FileSystem()
    for p in sorted(fmnist.rglob("*.png"))[::7]:
        fs.put_file(str(p), f"{BUCKET}/fanout/{p.relative_to(fmnist)}")
    fs.pipe_file(f"{BUCKET}/fanout/train/notes.txt", b"not an image")
    cfg = SourceConfig(uri=f"s3://{BUCKET}/fanout")
    driver = listing.list_images(cfg)
    assert same(rows(distributed.list_source(cfg.model_copy(update={"listing": "distributed"}), None)), driver)


def write_shards(fmnist: Path, folder: Path) -> tuple[list[dict], list[str]]:
    """The images as three manifest files (Parquet, CSV, gzipped CSV), with relative URIs and duplicates."""
    images = sorted(fmnist.rglob("*.png"))[:90]
    entries = [{"uri": os.path.relpath(p, folder), "label": p.parent.name,
                "split": p.parent.parent.name} for p in images]
    # Named again, later and under another label: the first row of a URI is the one kept.
    dupes = [dict(e, label="relabelled") for e in entries[5:15]]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(entries[:40]), folder / "part-0.parquet")
    (folder / "part-1.csv").write_text(csv(entries[40:70] + dupes[:5]))
    (folder / "part-2.csv.gz").write_bytes(gzip.compress(csv(entries[70:] + dupes[5:]).encode()))
    return entries + dupes, [str(p) for p in images]


def csv(entries: list[dict]) -> str:
    return "uri,label,split\n" + "".join(f"{e['uri']},{e['label']},{e['split']}\n" for e in entries)


def test_a_manifest_of_many_files_gives_the_one_file_manifest_s_rows(fmnist, tmp_path, ray_runtime):
    entries, images = write_shards(fmnist, tmp_path / "manifest")
    one = tmp_path / "manifest-one"
    one.mkdir()
    pq.write_table(pa.Table.from_pylist(entries), one / "all.parquet")  # the same rows, in one file
    driver, dropped = listing.list_unique(SourceConfig(uri=str(one / "all.parquet"), format="manifest"))
    for uri in (str(tmp_path / "manifest"), str(tmp_path / "manifest" / "part-*")):
        cfg = SourceConfig(uri=uri, format="manifest")
        assert distributed.wanted(cfg, None)  # auto: a folder or a glob of files is read by Ray tasks
        scaled = distributed.list_source(cfg, None)
        assert scaled.pieces == 3 and scaled.duplicates == dropped == 10 and scaled.listed == len(images)
        got = rows(scaled)
        assert same(got, driver) and sorted(got["uri"].to_pylist()) == images
        assert got["size"].null_count == 0  # the images were found: versioned by their folders' listings
        assert "relabelled" not in got["label"].to_pylist()
    limited = distributed.list_source(SourceConfig(uri=str(tmp_path / "manifest"), format="manifest", limit=25), None)
    want = listing.list_images(SourceConfig(uri=str(one / "all.parquet"), format="manifest", limit=25))
    assert same(rows(limited), want)


def test_a_manifest_s_version_columns_are_the_version_no_request_per_object(tmp_path, ray_runtime):
    folder = tmp_path / "versioned"
    folder.mkdir()
    # Objects that do not exist here: a stat would find nothing and version them "missing".
    pq.write_table(pa.table({"uri": ["s3://far/a.jpg", "s3://far/b.jpg"], "ETag": ['"e1"', '"e2"']}),
                   folder / "a.parquet")
    pq.write_table(pa.table({"uri": ["/nowhere/c.jpg"], "size": [123], "last_modified": ["2026-11-30T00:00:00Z"]}),
                   folder / "b.parquet")
    got = rows(distributed.list_source(SourceConfig(uri=str(folder), format="manifest"), None))
    ids = dict(zip(got["uri"].to_pylist(), got["image_id"].to_pylist()))
    assert ids == {"s3://far/a.jpg": listing.image_id("s3://far/a.jpg", "etag:e1"),
                   "s3://far/b.jpg": listing.image_id("s3://far/b.jpg", "etag:e2"),
                   "/nowhere/c.jpg": listing.image_id("/nowhere/c.jpg", "size:123:mtime:2026-11-30T00:00:00Z")}
    # The driver's path reads the same columns: switching paths re-extracts nothing.
    one = listing.list_images(SourceConfig(uri=str(folder / "a.parquet"), format="manifest"))
    assert dict(zip(one["uri"].to_pylist(), one["image_id"].to_pylist())) == {u: ids[u] for u in one["uri"].to_pylist()}


def test_a_manifest_file_without_a_uri_column_is_named(tmp_path, ray_runtime):
    folder = tmp_path / "bad"
    folder.mkdir()
    pq.write_table(pa.table({"uri": ["/x/a.jpg"]}), folder / "good.parquet")
    pq.write_table(pa.table({"path": ["/x/b.jpg"]}), folder / "wrong.parquet")
    with pytest.raises(Exception, match=r"wrong\.parquet has no 'uri' column"):
        distributed.list_source(SourceConfig(uri=str(folder), format="manifest"), None)


def inventory(fs: s3fs.S3FileSystem, fmnist: Path, prefix: str, fmt: str) -> tuple[str, list[str]]:
    """An S3 Inventory report of the bucket, as AWS writes one: manifest.json naming two data files."""
    schema = "Bucket, Key, Size, LastModifiedDate, ETag, IsLatest, IsDeleteMarker"
    objects = []
    for info in fs.find(f"{BUCKET}/{prefix}", detail=True).values():
        key = info["name"].split("/", 1)[1]
        objects.append({"Bucket": BUCKET, "Key": key, "Size": str(info["size"]),
                        "LastModifiedDate": str(info["LastModified"]), "ETag": info["ETag"].strip('"'),
                        "IsLatest": "true", "IsDeleteMarker": "false"})
    # An older version and a deleted object under the root: not current, not listed.
    objects.append(dict(objects[0], Key=f"{prefix}/train/Bag/old.png", IsLatest="false"))
    objects.append(dict(objects[0], Key=f"{prefix}/train/Bag/deleted.png", IsDeleteMarker="true"))
    objects.insert(0, dict(objects[0], Key=f"elsewhere/train/Bag/{prefix}.png"))  # outside the root
    files = []
    for i, part in enumerate((objects[: len(objects) // 2], objects[len(objects) // 2 :])):
        key = f"inventory/{BUCKET}/daily/data/part-{i}.{'csv.gz' if fmt == 'CSV' else 'parquet'}"
        if fmt == "CSV":  # no header, keys URL-encoded
            body = gzip.compress("".join(",".join(f'"{quote_plus(o[c]) if c == "Key" else o[c]}"' for c in
                                                  [c.strip() for c in schema.split(",")]) + "\n" for o in part).encode())
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist([{k.lower(): v for k, v in o.items()} for o in part]), sink)
            body = sink.getvalue().to_pybytes()
        fs.pipe_file(f"{BUCKET}/{key}", body)
        files.append({"key": key, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()})
    manifest = {"sourceBucket": BUCKET, "destinationBucket": f"arn:aws:s3:::{BUCKET}", "version": "2016-11-30",
                "fileFormat": fmt, "fileSchema": schema, "files": files}
    fs.pipe_file(f"{BUCKET}/inventory/{BUCKET}/daily/2026-12-01T01-00Z/manifest.json", json.dumps(manifest).encode())
    images = sorted(f"s3://{BUCKET}/{o['Key']}" for o in objects[:-2] if o["Key"].startswith(f"{prefix}/")
                    and o["Key"].endswith(".png"))
    return f"s3://{BUCKET}/inventory/{BUCKET}/daily/2026-12-01T01-00Z/manifest.json", images


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_an_s3_inventory_report_is_a_source_whose_ids_match_a_listing(tmp_path, fmnist, s3_server, ray_runtime,
                                                                       fmt):
    """Extract from the inventory; a listing of the same images then finds every one already done."""
    fs = s3fs.S3FileSystem()
    prefix = f"inv-{fmt.lower()}"
    for p in sorted(fmnist.rglob("*.png"))[::9]:
        fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.relative_to(fmnist)}")
    fs.put_file(str(next(fmnist.rglob("*.png"))), f"{BUCKET}/{prefix}/train/Bag/with space.png")
    fs.pipe_file(f"{BUCKET}/{prefix}/train/notes.txt", b"not an image")
    manifest, images = inventory(fs, fmnist, prefix, fmt)
    out = f"s3://{BUCKET}/{prefix}-out"
    extract_cfg = {"output": out, "weights": "random", "batch_size": 16}
    wf = write_workflow(tmp_path / "inv.yaml", source={"uri": manifest, "format": "s3_inventory",
                                                       "root": f"s3://{BUCKET}/{prefix}"}, extract=extract_cfg)
    result = extract.run(config.load_workflow(wf))
    assert (result.listed, result.ok, result.quarantined) == (len(images), len(images), 0)
    assert_exactly_once(out, listed=images, not_done=0)
    driver = listing.list_images(SourceConfig(uri=f"s3://{BUCKET}/{prefix}"))
    assert sorted(driver["uri"].to_pylist()) == images  # the inventory named the bucket's current images
    listed = write_workflow(tmp_path / "list.yaml", source={"uri": f"s3://{BUCKET}/{prefix}"}, extract=extract_cfg)
    again = extract.run(config.load_workflow(listed))
    assert (again.listed, again.already_done, again.ok) == (len(images), len(images), 0)


def test_an_inventory_source_that_is_not_a_report_says_what_it_needs(tmp_path, s3_server, ray_runtime):
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{BUCKET}/not-inventory/manifest.json", b'{"files": []}')
    cfg = SourceConfig(uri=f"s3://{BUCKET}/not-inventory/manifest.json", format="s3_inventory")
    with pytest.raises(FtlError, match=r"not an S3 Inventory manifest.json: it lacks \['sourceBucket'"):
        distributed.list_source(cfg, None)
    with pytest.raises(FtlError, match="source.listing: auto"):
        distributed.wanted(cfg.model_copy(update={"listing": "driver"}), None)
