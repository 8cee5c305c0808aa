"""URIs to filesystems: the only module that knows about S3 (or any other store).

Every URI becomes an fsspec filesystem plus a path on it, through fsspec's own URL handling,
so any fsspec filesystem works where a path is expected. s3fs reads the standard AWS
environment (AWS_ENDPOINT_URL, keys, region, profiles) unless the workflow's
`storage.options` say otherwise. Credentials live only inside the filesystem object.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from ftl.errors import StorageError


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; `uri` is how users see it."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def uri(self) -> str:
        return self.to_uri(self.path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts))

    def to_uri(self, path: str) -> str:
        """The user-facing URI of another path on the same filesystem: plain paths for local files."""
        return path if self.is_local else self.fs.unstrip_protocol(path)


def locate(uri: str, options: dict[str, Any] | None = None) -> Location:
    """Any URI fsspec knows (a local path, file://, s3://, gs://, az://, ...) as a filesystem and a path.

    `options` (the workflow's storage.options) go to remote filesystems only.
    """
    if "://" not in uri or uri.startswith("file://"):
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        return Location(fsspec.filesystem("file"), path)
    protocol = uri.split("://", 1)[0]
    kwargs = s3_options(options or {}) if protocol in ("s3", "s3a") else dict(options or {})
    # Listing caches would hide objects written during the run (markers, new parts).
    kwargs.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **kwargs)
    except ImportError as e:
        raise StorageError(f"{uri}: {e} (the fsspec filesystem for {protocol}://)") from None
    except ValueError as e:
        raise StorageError(f"{uri}: {e}; use a local path or a URI fsspec knows (s3://, gs://, az://, ...)") from None
    return Location(fs, path.rstrip("/"))


def s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """storage.options in s3fs's terms: `endpoint_url` and `region` go into the botocore client."""
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
    return {**opts, "client_kwargs": client_kwargs}


def resolve_relative(base: Location, uri: str) -> str:
    """A manifest's URI, made absolute against `base` when it is relative, in its canonical spelling.

    A relative URI stays inside the manifest's bucket: `../../elsewhere/a.png` from s3://b/m/ is
    refused, not read from another bucket.
    """
    if "://" in uri or uri.startswith("/"):
        return canonical(uri)
    path = posixpath.normpath(posixpath.join(base.path, uri))
    if not base.is_local and (path.startswith("..") or path.split("/")[0] != base.path.split("/")[0]):
        raise ValueError(f"{uri!r} leaves the manifest's bucket; give the image's full URI")
    return base.to_uri(path)


def canonical(uri: str) -> str:
    """One spelling per object, as fsspec names it: s3a:// is s3://, file:///a/./b is /a/b.

    An object store's keys are kept as written (`a/./b` is a key of its own there); only the
    scheme is made the filesystem's first name for itself.
    """
    if "://" not in uri or uri.startswith("file://"):
        return os.path.normpath(uri.removeprefix("file://")) if uri.startswith(("/", "file://")) else uri
    protocol, rest = uri.split("://", 1)
    try:
        names = fsspec.get_filesystem_class(protocol).protocol
    except (ImportError, ValueError):
        return uri  # no filesystem for it here: the read says so, row by row
    first = names[0] if isinstance(names, (tuple, list)) else names
    if first in ("http", "https"):
        return uri  # http and https are different URLs of maybe different servers
    return f"{first}://{rest}"


def arrow_filesystem(loc: Location):
    """The same filesystem for readers that want pyarrow's interface (Ray Data's)."""
    import pyarrow.fs

    if loc.is_local:
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(loc.fs))


def strip_scheme(uri: str) -> str:
    """`s3://bucket/key` → `bucket/key`: the path form fsspec and pyarrow filesystems take."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def stage_table(table: pa.Table, root: Location) -> str:
    """Write Parquet under `<root>/_staging/`, where no reader of the output looks."""
    staging = root.join("_staging")
    staging.fs.makedirs(staging.path, exist_ok=True)
    path = posixpath.join(staging.path, f"{uuid.uuid4().hex}.parquet")
    with root.fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return path


def part_name(ids: pa.Array | pa.ChunkedArray) -> str:
    """A part's name from the image ids it holds: the same rows always make the same name."""
    digest = hashlib.blake2b(digest_size=16)
    for image_id in sorted(ids.to_pylist()):
        digest.update(image_id.encode() + b"\n")
    return f"part-{digest.hexdigest()}.parquet"
