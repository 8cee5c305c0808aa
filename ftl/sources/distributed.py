"""The listing as Ray Data operations: listed in parallel or read from many manifest files, duplicates and
`source.limit` applied by partitioned operations, the rows kept in the object store.

`source.listing: auto` takes this path for an S3 Inventory and for a manifest of many files;
`distributed` takes it for any imagefolder or manifest too; `driver` never (ftl.sources.listing).
The results are the same rows as the driver's path (tests compare the two).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ftl.config import SourceConfig
from ftl.errors import SourceError, WorkflowError
from ftl.io import distributed_diff, storage
from ftl.logs import say
from ftl.sources import fanout, listing, manifests, sample


@dataclass
class ScaledListing:
    rows: object  # a materialized Ray Dataset of LISTING rows
    listed: int
    duplicates: int
    pieces: int  # folders listed, or manifest files read


def wanted(cfg: SourceConfig, storage_options: dict | None) -> bool:
    if cfg.format == "webdataset":
        if cfg.listing == "distributed":
            raise WorkflowError("source.listing: distributed is for imagefolder, manifest and s3_inventory sources; "
                                "a WebDataset source is listed by its shards (set source.listing: auto)")
        return False
    if cfg.format == "s3_inventory":
        if cfg.listing == "driver":
            raise WorkflowError("an s3_inventory source is read by Ray tasks: set source.listing: auto")
        return True
    return cfg.listing == "distributed" or cfg.listing == "auto" and manifests.is_sharded(cfg, storage_options)


def list_source(cfg: SourceConfig, storage_options: dict | None) -> ScaledListing:
    """The source's unique (and, with `limit`, sampled) rows; the driver holds counts and block references."""
    from ftl.pipeline.runtime import ensure_ray

    ensure_ray()
    started = time.perf_counter()
    if cfg.format == "imagefolder":
        root = storage.locate(cfg.uri, storage_options)
        say(f"listing {root.uri} in parallel (a folder per call, on Lister actors)")
        refs, pieces = fanout.listing_refs(root, cfg.extensions, storage_options)
        import ray.data

        raw = ray.data.from_arrow_refs(refs).materialize()
    else:
        ds, pieces = manifests.dataset(cfg, storage_options)
        say(f"reading {pieces:,} {'inventory' if cfg.format == 's3_inventory' else 'manifest'} file(s) of "
            f"{cfg.uri}")
        raw = ds.materialize()
    found = raw.count()
    duplicates = 0
    rows = raw
    if cfg.format == "manifest" and found:  # a listing of files or an inventory names each object once
        rows = sample.unique_uris_dataset(raw, partitions=distributed_diff.partitions(found)).materialize()
        duplicates = found - rows.count()
    if cfg.limit and found:
        rows = sample.representative_dataset(rows, cfg.limit).materialize()
    rows = rows.select_columns(listing.LISTING.names).materialize()
    listed = rows.count()
    if not listed:
        raise SourceError(f"source.uri {cfg.uri} holds no images with extensions {cfg.extensions}")
    say(f"listed {listed:,} images ({duplicates:,} duplicate rows dropped) from {pieces:,} "
        f"{'folders' if cfg.format == 'imagefolder' else 'files'} in {time.perf_counter() - started:.1f}s")
    return ScaledListing(rows=rows, listed=listed, duplicates=duplicates, pieces=pieces)
