"""What identifies an image: its URI and its object's version, hashed; versions read from a listing or a stat."""

from __future__ import annotations

import hashlib
import posixpath
from collections import defaultdict

from ftl.io import storage


def image_id(uri: str, version: str) -> str:
    """Stable id: the URI plus the object's version (ETag, or size and mtime), hashed."""
    return hashlib.blake2b(f"{uri}\n{version}".encode(), digest_size=16).hexdigest()


def version_of(info: dict) -> str:
    """What changes when the object changes: S3's ETag, else size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{etag.strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"size:{info.get('size')}:mtime:{mtime}"


def stat_all(uris: list[str], storage_options: dict | None) -> dict[str, dict]:
    """Version and size of many objects with one listing per folder instead of one request per object."""
    by_dir = defaultdict(set)
    for u in uris:
        by_dir[posixpath.dirname(u)].add(u)
    versions = {}
    for folder, wanted in by_dir.items():
        loc = storage.locate(folder, storage_options)
        if not loc.fs.exists(loc.path):
            continue  # the images stay listed and are quarantined as unreadable
        for info in loc.fs.ls(loc.path, detail=True):
            uri = loc.to_uri(info["name"])
            if uri in wanted:
                versions[uri] = {"version": version_of(info), "size": info.get("size")}
    return versions
