"""WebDataset input: `.tar` shards (as img2dataset writes them) read with Ray Data's reader.

Images inside shards cannot be listed without reading the shards, so the already-done check
runs in the workers against a broadcast sorted array of done ids (16 bytes per id), and
finished shards are recorded in `_shards.parquet` so that a rerun does not even open them.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ftl.config import SourceConfig
from ftl.io import incremental, storage
from ftl.sources import listing

SHARDS_FILE = "_shards.parquet"
SHARDS = pa.schema([("uri", pa.string()), ("version", pa.string()), ("split", pa.string())])


def list_shards(cfg: SourceConfig, storage_options: dict | None) -> pa.Table:
    """Every `.tar` under the source: its URI, version (ETag or size+mtime) and split (its folder)."""
    root = storage.locate(cfg.uri, storage_options)
    if not root.fs.exists(root.path):
        raise listing.SourceError(f"source.uri {root.uri} does not exist")
    found = root.fs.find(root.path, detail=True)
    rows = {"uri": [], "version": [], "split": []}
    for path, info in sorted(found.items()):
        if path.endswith(".tar"):
            parts = posixpath.relpath(path, root.path).split("/")
            rows["uri"].append(root.to_uri(path))
            rows["version"].append(listing.version_of(info))
            rows["split"].append(parts[-2] if len(parts) >= 2 else None)
    if not rows["uri"]:
        raise listing.SourceError(f"source.uri {root.uri} holds no .tar shards")
    return pa.table(rows, schema=SHARDS)


def finished_shards(out: storage.Location) -> pa.Table:
    marker = out.join(SHARDS_FILE)
    if not out.fs.exists(marker.path):
        return SHARDS.empty_table()
    with out.fs.open(marker.path, "rb") as f:
        return pq.read_table(f).select(SHARDS.names)


def record_finished(out: storage.Location, shards: pa.Table) -> None:
    """After a successful run every shard read is complete; a crash leaves the old record."""
    earlier = finished_shards(out)
    earlier = earlier.filter(pc.invert(pc.is_in(earlier["uri"], value_set=shards["uri"])))  # changed: new version
    merged = pa.concat_tables([earlier, shards.select(SHARDS.names)])
    staged = storage.stage_table(merged, out)
    out.fs.mv(staged, out.join(SHARDS_FILE).path)


def pending_shards(shards: pa.Table, out: storage.Location) -> pa.Table:
    done = finished_shards(out)
    key = pc.binary_join_element_wise(shards["uri"], shards["version"], "\n")
    done_key = pc.binary_join_element_wise(done["uri"], done["version"], "\n")
    return shards.filter(pc.invert(pc.is_in(key, value_set=done_key)))


def superseded(out: storage.Location, todo: pa.Table, folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Rows of the shards about to be read whose id is not their image's id under the shard's current
    version: the shard changed since they were written, and its new rows will replace them."""
    versions = dict(zip(todo["uri"].to_pylist(), todo["version"].to_pylist()))
    stale: dict[str, set[str]] = {}
    for folder in folders:
        for part in storage.list_parquet(out.join(folder)):
            with out.fs.open(part, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(incremental.BATCH_ROWS, columns=["image_id", "uri"]):
                    shard = pc.replace_substring_regex(batch.column("uri"), "#[^#]*$", "")
                    rows = batch.filter(pc.is_in(shard, value_set=todo["uri"]))  # vectorised: most rows go here
                    for image_id, uri in zip(rows.column("image_id").to_pylist(), rows.column("uri").to_pylist()):
                        if listing.image_id(uri, versions[uri.rpartition("#")[0]]) != image_id:
                            stale.setdefault(part, set()).add(image_id)
    return stale


def done_keys(out: storage.Location, folders: tuple[str, ...]) -> np.ndarray:
    """Sorted 16-byte ids of every committed row, streamed column by column."""
    keys = []
    for folder in folders:
        for part in storage.list_parquet(out.join(folder)):
            with out.fs.open(part, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(incremental.BATCH_ROWS, columns=["image_id"]):
                    keys.append(incremental.id_bytes(batch.column("image_id")))
    return np.sort(np.concatenate(keys)) if keys else np.array([], dtype="S16")


def to_images(batch: pa.Table, *, shards: dict[str, tuple[str, str | None]], done,
              image_keys: list[str], label_key: str | None) -> pa.Table:
    """Raw WebDataset rows → the columns decode expects, with the image bytes inline."""
    import ray

    if isinstance(done, ray.ObjectRef):  # broadcast once through the object store, read zero-copy
        done = ray.get(done)
    # Ray reports each shard's path without its scheme (`bucket/key`): map it back to the listed URI.
    by_path = {storage.strip_scheme(u): u for u in shards}
    urls = [u if u in shards else by_path[storage.strip_scheme(u)] for u in batch["__url__"].to_pylist()]
    keys = batch["__key__"].to_pylist()
    uris = [f"{u}#{k}" for u, k in zip(urls, keys)]
    ids = [listing.image_id(uri, shards[u][0]) for uri, u in zip(uris, urls)]
    found = np.zeros(len(ids), dtype=bool)
    if len(done):
        wanted = incremental.id_bytes(pa.array(ids))
        pos = np.searchsorted(done, wanted).clip(max=len(done) - 1)
        found = done[pos] == wanted
    data = [None] * len(ids)
    for name in image_keys:
        if name in batch.column_names:
            column = batch[name].to_pylist()
            data = [d if d is not None else c if isinstance(c, bytes) else None for d, c in zip(data, column)]
    labels = None
    if label_key and label_key in batch.column_names:
        # A sample without the member reads as null (or NaN once Ray pickles a mixed column).
        labels = [v.decode().strip() if isinstance(v, bytes) else v if isinstance(v, str) else None
                  for v in batch[label_key].to_pylist()]
    return pa.table({
        "image_id": ids,
        "uri": uris,
        "label": pa.array(labels if labels else [None] * len(ids), pa.string()),
        "split": pa.array([shards[u][1] for u in urls], pa.string()),
        # Done rows travel on without their bytes, so that the sink can count them.
        "data": pa.array([b"" if f else (d or b"") for d, f in zip(data, found)], pa.binary()),
        "done": pa.array(found),
    })

