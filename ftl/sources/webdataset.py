"""WebDataset input: `.tar` shards (as img2dataset writes them) read with Ray Data's reader.

Images inside shards cannot be listed without reading the shards, so the already-done check
runs in the workers against a broadcast sorted array of done ids (16 bytes per id), and
finished shards are recorded in `_shards.parquet` so that a rerun does not even open them.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ftl.config import SourceConfig
from ftl.io import incremental, storage
from ftl.sources import identity, listing

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
            rows["version"].append(identity.version_of(info))
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
        for batch in incremental.committed(out, folder, ["image_id", "uri"]):
            shard = pc.replace_substring_regex(batch.column("uri"), "#[^#]*$", "")
            rows = batch.filter(pc.is_in(shard, value_set=todo["uri"]))  # vectorised: most rows go here
            for image_id, uri in zip(rows.column("image_id").to_pylist(), rows.column("uri").to_pylist()):
                if identity.image_id(uri, versions[uri.rpartition("#")[0]]) != image_id:
                    stale.setdefault(folder, set()).add(image_id)
    return stale


def done_keys(out: storage.Location, folders: tuple[str, ...]) -> np.ndarray:
    """Sorted 16-byte ids of every committed row, streamed column by column."""
    keys = []
    for folder in folders:
        for batch in incremental.committed(out, folder, ["image_id"]):
            keys.append(incremental.id_bytes(batch.column("image_id")))
    return np.sort(np.concatenate(keys)) if keys else np.array([], dtype="S16")


def read(todo: pa.Table, *, image_keys: list[str], label_key: str | None, done, rows: int,
         storage_options: dict | None, max_bytes: int | None = None):
    """A Ray Dataset of the pending shards' samples, one read task per shard, in blocks of `rows` samples."""
    import ray

    return ray.data.from_arrow(todo.select(["uri", "version", "split"])).map_batches(
        read_shards, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"image_keys": image_keys, "label_key": label_key, "done": done, "rows": rows,
                   "storage_options": storage_options or None, "max_bytes": max_bytes},
    )


class Oversized(int):
    """A member over extract.max_image_bytes, by its tar header's size: never read."""


def samples(tar: tarfile.TarFile, wanted: set[str], *,
            max_bytes: int | None = None) -> Iterator[tuple[str, dict[str, bytes | Oversized], bool]]:
    """(key, {suffix: bytes}, repeated) per sample, reading only the members whose suffix is wanted.

    Members of one sample are adjacent and share the name up to the first dot of the basename
    (the WebDataset convention). Other members are seeked over, never read, and so is a member
    whose header says it is over `max_bytes`. A key that comes back after other keys (members
    not adjacent, or a repeated key) is a sample of its own, keyed `key@offset` and `repeated`:
    one id, one row, whatever the shard holds.
    """
    key, name_of_key, members, seen = None, None, {}, set()
    for info in tar:
        if not info.isreg():
            continue
        folder, _, base = info.name.rpartition("/")
        stem, _, suffix = base.partition(".")
        name = f"{folder}/{stem}" if folder else stem
        if name != name_of_key:
            if key is not None:
                yield key, members, key != name_of_key
                seen.add(name_of_key)
            key = f"{name}@{info.offset}" if name in seen else name
            name_of_key, members = name, {}
        if suffix.lower() in wanted:
            too_big = max_bytes is not None and info.size > max_bytes
            members[suffix.lower()] = Oversized(info.size) if too_big else tar.extractfile(info).read()
    if key is not None:
        yield key, members, key != name_of_key


def read_shards(batch: pa.Table, *, image_keys: list[str], label_key: str | None, done, rows: int,
                storage_options: dict | None, max_bytes: int | None = None) -> Iterator[pa.Table]:
    """Shards → the columns the readers expect (image bytes inline), `rows` samples per block."""
    import ray

    if isinstance(done, ray.ObjectRef):  # broadcast once through the object store, read zero-copy
        done = ray.get(done)
    keys = [k.lower() for k in image_keys]
    for uri, version, split in zip(*(batch[c].to_pylist() for c in ("uri", "version", "split"))):
        loc = storage.locate(uri, storage_options)
        with loc.fs.open(loc.path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            pending = []
            wanted = {*keys, *([label_key.lower()] if label_key else [])}
            for key, members, repeated in samples(tar, wanted, max_bytes=max_bytes):
                pending.append(sample_row(f"{uri}#{key}", version, split, members, keys, label_key,
                                          max_bytes=max_bytes, repeated=repeated))
                if len(pending) == rows:
                    yield rows_table(pending, done)
                    pending = []
            if pending:
                yield rows_table(pending, done)


def sample_row(uri: str, version: str, split: str | None, members: dict[str, bytes], keys: list[str],
               label_key: str | None, *, max_bytes: int | None = None, repeated: bool = False) -> dict:
    """One sample: its image bytes, its label, and why it cannot be used (no image, too big, a repeated key,
    a label that is not text)."""
    data = next((members[k] for k in keys if k in members), None)
    problem = "" if data is not None else f"sample has no image member (looked for {', '.join(keys)})"
    if isinstance(data, Oversized):
        problem, data = f"{int(data)} bytes exceeds extract.max_image_bytes={max_bytes}", None
    if repeated:
        problem = ("its key repeats in the shard, after other samples: a sample's members must be adjacent "
                   "and its key unique (rewrite the shard with each key's members together)")
    label = None
    if label_key and isinstance(members.get(label_key.lower()), Oversized):
        problem = f"label member .{label_key} is over extract.max_image_bytes={max_bytes}"
    elif label_key and label_key.lower() in members:
        try:
            label = members[label_key.lower()].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            problem = f"label member .{label_key} is not UTF-8 text: {e}"
    return {"image_id": identity.image_id(uri, version), "uri": uri, "label": label, "split": split,
            "data": data or b"", "problem": problem}


def rows_table(rows: list[dict], done: np.ndarray) -> pa.Table:
    """Samples as a block; done ones travel on without their bytes, so that the sink can count them."""
    ids = [r["image_id"] for r in rows]
    found = np.zeros(len(ids), dtype=bool)
    if len(done):
        wanted = incremental.id_bytes(pa.array(ids, pa.string()))
        pos = np.searchsorted(done, wanted).clip(max=len(done) - 1)
        found = done[pos] == wanted
    return pa.table({
        "image_id": pa.array(ids, pa.string()),
        "uri": pa.array([r["uri"] for r in rows], pa.string()),
        "label": pa.array([r["label"] for r in rows], pa.string()),
        "split": pa.array([r["split"] for r in rows], pa.string()),
        "data": pa.array([b"" if f else r["data"] for r, f in zip(rows, found)], pa.binary()),
        "problem": pa.array([r["problem"] for r in rows], pa.string()),
        "done": pa.array(found),
    })
