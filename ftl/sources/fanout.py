"""An imagefolder listed by many Ray tasks at once, one folder per task, the tree fanned out as it is found.

A sequential listing of S3 pages 1,000 keys per request, one request after another: 100M objects
is 100,000 round trips, hours every night. Here each task lists one folder (one delimiter
listing: its files and its subfolders), keeps its rows in the object store and hands the driver
only the subfolders, which become tasks in turn. The driver holds folder names and object
references, never a row per image. A folder of millions of files is still one task's pages.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa

from ftl.io import storage

# Listing tasks wait on the network, not the CPU: many share one core.
TASK_CPUS = 0.0625
IN_FLIGHT = 64


def list_folder(root_uri: str, folder: str, extensions: tuple[str, ...], storage_options: dict | None):
    """One folder's images as LISTING rows, and its subfolders (paths)."""
    from ftl.sources import listing

    root = storage.locate(root_uri, storage_options)
    rows = {n: [] for n in listing.LISTING.names}
    subfolders = []
    for info in root.fs.ls(folder, detail=True):
        path = info["name"].rstrip("/")
        if info.get("type") == "directory":
            if path != folder.rstrip("/"):
                subfolders.append(path)
            continue
        if not path.lower().endswith(extensions):
            continue
        parts = posixpath.relpath(path, root.path).split("/")
        uri = root.to_uri(path)
        rows["image_id"].append(listing.image_id(uri, listing.version_of(info)))
        rows["uri"].append(uri)
        rows["label"].append(parts[-2] if len(parts) >= 2 else None)
        rows["split"].append(parts[-3] if len(parts) >= 3 else None)
        rows["size"].append(info.get("size"))
    return pa.table(rows, schema=listing.LISTING), subfolders


def listing_refs(root: storage.Location, extensions: list[str], storage_options: dict | None,
                 progress=None) -> tuple[list, int]:
    """Object references to each folder's rows, and how many folders were listed."""
    import ray

    task = ray.remote(num_cpus=TASK_CPUS, num_returns=2, max_retries=3)(list_folder)
    exts = tuple(e.lower() for e in extensions)
    waiting, pending, tables, listed = [root.path], {}, [], 0
    while waiting or pending:
        while waiting and len(pending) < IN_FLIGHT:
            rows, subs = task.remote(root.uri, waiting.pop(), exts, storage_options)
            pending[subs] = rows
        [done], _ = ray.wait(list(pending), num_returns=1)
        tables.append(pending.pop(done))
        waiting += ray.get(done)
        listed += 1
        if progress is not None:
            progress(listed, len(waiting) + len(pending))
    return tables, listed


def dataset(root: storage.Location, extensions: list[str], storage_options: dict | None, progress=None):
    """The imagefolder's LISTING rows as a Ray Dataset, listed in parallel."""
    import ray.data

    refs, _ = listing_refs(root, extensions, storage_options, progress)
    return ray.data.from_arrow_refs(refs)
