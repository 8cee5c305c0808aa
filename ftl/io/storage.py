"""URIs to filesystems: the only module that knows about S3.

Every URI becomes an fsspec filesystem plus a path on it. s3fs reads the standard
AWS environment (AWS_ENDPOINT_URL, keys, region, profiles) unless the workflow's
`storage.options` say otherwise. Credentials live only inside the filesystem object.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; `uri` is how users see it."""

    fs: fsspec.AbstractFileSystem
    path: str
    scheme: str

    @property
    def uri(self) -> str:
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts), self.scheme)

    def to_uri(self, path: str) -> str:
        """The user-facing URI of another path on the same filesystem."""
        return path if self.scheme == "file" else f"{self.scheme}://{path}"


def locate(uri: str, options: dict[str, Any] | None = None) -> Location:
    """Resolve a local path, file:// or s3:// URI."""
    scheme, _, rest = uri.partition("://")
    if not _:
        scheme, rest = "file", uri
    if scheme == "file":
        return Location(fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(rest)), "file")
    if scheme in ("s3", "s3a"):
        return Location(s3_filesystem(options or {}), rest.rstrip("/"), "s3")
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}; use a local path, file:// or s3://")


def s3_filesystem(options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    import s3fs

    opts = dict(options)
    endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    client_kwargs = dict(opts.pop("client_kwargs", {}))
    if endpoint:
        client_kwargs.setdefault("endpoint_url", endpoint)
    region = opts.pop("region", None)
    if region:
        client_kwargs.setdefault("region_name", region)
    # Listing caches would hide objects written during the run (markers, new parts).
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False, **opts)


def resolve(base: Location, uri: str) -> str:
    """A manifest's URI, made absolute against `base` when it is relative."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "://" in uri or uri.startswith("/"):
        return uri
    return base.to_uri(posixpath.normpath(posixpath.join(base.path, uri)))


def arrow_filesystem(loc: Location):
    """The same filesystem for readers that want pyarrow's interface (Ray Data's)."""
    import pyarrow.fs

    if loc.scheme == "file":
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(loc.fs))


def strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def stage_table(table: pa.Table, root: Location) -> str:
    """Write Parquet under `<root>/_staging/`, where no reader of the output looks."""
    staging = root.join("_staging")
    staging.fs.makedirs(staging.path, exist_ok=True)
    path = posixpath.join(staging.path, f"{uuid.uuid4().hex}.parquet")
    with root.fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return path


def write_table_atomic(table: pa.Table, folder: Location, name: str) -> str:
    """Stage beside `folder`, then rename into it, so readers never see half a file."""
    root = Location(folder.fs, posixpath.dirname(folder.path), folder.scheme)
    staged = stage_table(table, root)
    folder.fs.makedirs(folder.path, exist_ok=True)
    final = posixpath.join(folder.path, name)
    folder.fs.mv(staged, final)
    return final


def list_parquet(loc: Location) -> list[str]:
    """Committed Parquet parts under a folder."""
    if not loc.fs.exists(loc.path):
        return []
    return sorted(p for p in loc.fs.find(loc.path) if p.endswith(".parquet"))


def read_parquet(loc: Location, *, columns: list[str] | None = None) -> pa.Table | None:
    """All committed parts of a folder as one table, or None when there are none."""
    parts = list_parquet(loc)
    if not parts:
        return None
    return pq.ParquetDataset(parts, filesystem=loc.fs).read(columns=columns)
