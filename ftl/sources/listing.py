"""Listing a dataset: which images exist, their labels and splits, and a stable id for each."""

from __future__ import annotations

import posixpath
from collections import defaultdict

import pyarrow as pa

from ftl.config import SourceConfig
from ftl.errors import SourceError
from ftl.io import storage
from ftl.sources import manifests, sample
from ftl.sources.identity import image_id, stat_all, version_of  # noqa: F401  (the listing's terms)

# `size` (bytes, when the store reports it) lets readers refuse an oversized object before reading it.
LISTING = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string()), ("split", pa.string()),
     ("size", pa.int64())]
)



def check_exists(cfg: SourceConfig, *, storage_options: dict | None = None) -> None:
    """One stat of the source's root, so that a missing source fails before the output's lease is taken."""
    import glob

    loc = storage.locate(cfg.uri, storage_options)
    there = loc.fs.glob(loc.path) if glob.has_magic(loc.path) else loc.fs.exists(loc.path)
    if not there:
        raise SourceError(f"source.uri {loc.uri} does not exist")


def list_images(cfg: SourceConfig, *, storage_options: dict | None = None) -> pa.Table:
    """All images of the source, sorted by URI, one row per URI, as a LISTING table."""
    return list_unique(cfg, storage_options=storage_options)[0]


def list_unique(cfg: SourceConfig, *, storage_options: dict | None = None) -> tuple[pa.Table, int]:
    """The listing, and how many duplicate rows (a manifest naming an image twice) it dropped."""
    if cfg.format == "imagefolder":
        table = imagefolder(storage.locate(cfg.uri, storage_options), cfg.extensions)
    else:
        table = manifest(storage.locate(cfg.uri, storage_options), storage_options)
    table, duplicates = sample.unique_uris(table.sort_by("uri"))
    if cfg.limit:
        table = sample.representative(table, cfg.limit)
    if table.num_rows == 0:
        raise SourceError(f"source.uri {cfg.uri} holds no images with extensions {cfg.extensions}")
    return table, duplicates


def imagefolder(root: storage.Location, extensions: list[str]) -> pa.Table:
    """`<root>/[<split>/]<class>/<file>`: label and split come from the path."""
    if not root.fs.exists(root.path):
        raise SourceError(f"source.uri {root.uri} does not exist")
    found = root.fs.find(root.path, detail=True)
    exts = tuple(e.lower() for e in extensions)
    rows = defaultdict(list)
    for path, info in found.items():
        if info.get("type") == "directory" or not path.lower().endswith(exts):
            continue
        parts = posixpath.relpath(path, root.path).split("/")
        uri = root.to_uri(path)
        rows["image_id"].append(image_id(uri, version_of(info)))
        rows["uri"].append(uri)
        rows["label"].append(parts[-2] if len(parts) >= 2 else None)
        rows["split"].append(parts[-3] if len(parts) >= 3 else None)
        rows["size"].append(info.get("size"))
    return pa.table(rows or {n: [] for n in LISTING.names}, schema=LISTING)


def manifest(loc: storage.Location, storage_options: dict | None) -> pa.Table:
    """A Parquet or CSV file with a `uri` column and optional `label` and `split` columns."""
    import glob

    if glob.has_magic(loc.path) or loc.fs.isdir(loc.path):
        raise SourceError(f"source.uri {loc.uri} is a folder of manifest files, which Ray tasks read: set "
                          f"source.listing: auto (or distributed) instead of driver")
    if not loc.fs.exists(loc.path):
        raise SourceError(f"source.uri {loc.uri} does not exist")
    # The same reader as a Ray task's for one file of a sharded manifest: the same rows and ids.
    return manifests.read_manifest_file(loc.uri, 0, storage_options).drop_columns(["_order"])
