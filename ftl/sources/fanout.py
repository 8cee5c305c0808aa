"""An imagefolder listed many folders at once by Ray actors, the tree fanned out as it is found.

A sequential listing of S3 pages 1,000 keys per request, one request after another: 100M objects
is 100,000 round trips, hours every night. Here each call lists one folder (one delimiter
listing: its files and its subfolders), keeps its rows in the object store and hands the driver
only the subfolders, which become calls in turn, spread over Lister actors on the nodes. The
driver holds folder names and object references, never a row per image. A folder of millions
of files is still one call's pages.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa

from ftl.io import storage
from ftl.sources import identity, listing

# Listings wait on the network, not the CPU: each Lister actor (one process) keeps IN_FLIGHT of
# them going on threads. A Ray task per folder would cost a worker process per concurrent
# listing, which on a small node takes longer to start than the listing itself.
IN_FLIGHT = 32
MAX_LISTERS = 8


def list_folder(root: storage.Location, folder: str, extensions: tuple[str, ...]):
    """One folder's images as LISTING rows, and its subfolders (paths)."""
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
        rows["image_id"].append(identity.image_id(uri, identity.version_of(info)))
        rows["uri"].append(uri)
        rows["label"].append(parts[-2] if len(parts) >= 2 else None)
        rows["split"].append(parts[-3] if len(parts) >= 3 else None)
        rows["size"].append(info.get("size"))
    return pa.table(rows, schema=listing.LISTING), subfolders


class Lister:
    """Ray actor: lists folders of one root, many at once (threads sharing one filesystem client)."""

    def __init__(self, root_uri: str, extensions: tuple[str, ...], storage_options: dict | None):
        self.root, self.extensions = storage.locate(root_uri, storage_options), extensions

    def folder(self, path: str):
        return list_folder(self.root, path, self.extensions)


def listing_refs(root: storage.Location, extensions: list[str], storage_options: dict | None) -> tuple[list, int]:
    """Object references to each folder's rows, and how many folders were listed."""
    import ray

    exts = tuple(e.lower() for e in extensions)
    # Parsing a listing page (botocore's XML) costs CPU about as long as the request waits: one
    # lister per CPU, spread over the nodes, up to MAX_LISTERS.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    actor = ray.remote(num_cpus=0, max_concurrency=IN_FLIGHT, max_restarts=3, max_task_retries=3)(Lister)
    listers = [actor.options(scheduling_strategy="SPREAD").remote(root.uri, exts, storage_options)
               for _ in range(max(1, nodes, min(cpus, MAX_LISTERS)))]
    waiting, pending, tables, turn = [root.path], {}, [], 0
    while waiting or pending:
        while waiting and len(pending) < IN_FLIGHT * len(listers):
            rows, subs = listers[turn % len(listers)].folder.options(num_returns=2).remote(waiting.pop())
            turn += 1
            pending[subs] = rows
        [done], _ = ray.wait(list(pending), num_returns=1)
        tables.append(pending.pop(done))
        waiting += ray.get(done)
    for lister in listers:
        ray.kill(lister, no_restart=True)
    return tables, len(tables)

