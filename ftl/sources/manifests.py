"""Manifests that scale: many Parquet or CSV files, or an S3 Inventory report, read by Ray Data tasks.

Each file is read by its own task, which resolves its URIs, labels and versions and emits
LISTING rows plus `_order` (file index, row index: which row of a URI named twice came first).
The driver holds the list of files, never a row. Where a manifest carries an ETag, a size or a
last-modified column, that is the image's version and no request per object is made; an
inventory always carries them. Without them, each task lists the folders its URIs live in.
"""

from __future__ import annotations

import glob as globmod
import json
import posixpath
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ftl.config import SourceConfig
from ftl.errors import SourceError
from ftl.io import storage
from ftl.sources import identity

SUFFIXES = (".parquet", ".csv", ".csv.gz")
TEXT = ("uri", "label", "split")  # columns read as text
NO_VALUE = ["", "NaN", "nan", "NULL", "null"]  # not pyarrow's whole list: "NA" and "N/A" can be class names
ORDERED = pa.schema(list(pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("label", pa.string()),
                                    ("split", pa.string()), ("size", pa.int64())])) + [("_order", pa.int64())])
# A manifest's version columns, by normalised name (lower case, no '_' or '-'): S3 Inventory's
# ETag/e_tag, Size/size, LastModifiedDate/last_modified_date, and the usual spellings.
ETAG, SIZE, MTIME = ("etag",), ("size", "bytes"), ("lastmodified", "lastmodifieddate", "mtime", "modified")


def norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def is_sharded(cfg: SourceConfig, storage_options: dict | None) -> bool:
    """An inventory, or a manifest given as a folder or a glob of files."""
    if cfg.format == "s3_inventory":
        return True
    if cfg.format != "manifest":
        return False
    loc = storage.locate(cfg.uri, storage_options)
    return globmod.has_magic(loc.path) or loc.fs.isdir(loc.path)


def manifest_files(cfg: SourceConfig, storage_options: dict | None) -> list[str]:
    """The manifest's files as URIs, sorted: a glob's matches, a folder's Parquet/CSV files, or the one file."""
    loc = storage.locate(cfg.uri, storage_options)
    if globmod.has_magic(loc.path):
        paths = loc.fs.glob(loc.path)
    elif loc.fs.isdir(loc.path):
        paths = [p for p in loc.fs.find(loc.path) if p.lower().endswith(SUFFIXES)
                 and not posixpath.basename(p).startswith(("_", "."))]
    else:
        paths = [loc.path] if loc.fs.exists(loc.path) else []
    if not paths:
        raise SourceError(f"source.uri {cfg.uri} names no manifest files (*.parquet, *.csv, *.csv.gz)")
    return [loc.to_uri(p) for p in sorted(paths)]


def read_manifest_file(uri: str, index: int, storage_options: dict | None) -> pa.Table:
    """One manifest file as ORDERED rows; relative URIs are resolved against the file's folder."""
    loc = storage.locate(uri, storage_options)
    with loc.fs.open(loc.path, "rb", compression="infer") as f:
        # A CSV's uri, label and split are text whatever they look like ("007" stays "007"); empty,
        # NULL or NaN in them is no value, as a null or a NaN is in Parquet.
        table = pq.read_table(f) if loc.path.endswith(".parquet") else pacsv.read_csv(f, convert_options=(
            pacsv.ConvertOptions(column_types=dict.fromkeys(TEXT, pa.string()), strings_can_be_null=True,
                                 null_values=NO_VALUE)))
    if "uri" not in table.column_names:
        raise SourceError(f"manifest {uri} has no 'uri' column; columns: {table.column_names}. Name the image "
                          f"column 'uri' (label and split are optional)")
    check_types(table, uri)
    base = storage.Location(loc.fs, posixpath.dirname(loc.path))
    uris = []
    for row, u in enumerate(table["uri"].to_pylist()):
        if not u or not u.strip():
            raise SourceError(f"manifest {uri} row {row} has an empty uri; remove the row or give the image's URI")
        try:
            uris.append(storage.resolve_relative(base, u.strip()))
        except ValueError as e:
            raise SourceError(f"manifest {uri} row {row}: {e}") from e
    versions = version_columns(table)
    if versions is None:  # no version in the manifest: one listing per folder its images live in
        found = identity.stat_all(uris, storage_options)
        versions = [found[u]["version"] if u in found else "missing" for u in uris]
        sizes = [found.get(u, {}).get("size") for u in uris]
    else:
        sizes = column(table, SIZE, pa.int64())
    return pa.table({
        "image_id": [identity.image_id(u, v) for u, v in zip(uris, versions)],
        "uri": uris,
        "label": strings(table, "label"),
        "split": strings(table, "split"),
        "size": sizes if sizes is not None else pa.nulls(table.num_rows, pa.int64()),
        "_order": (np.int64(index) << 32) + np.arange(table.num_rows, dtype=np.int64),
    }, schema=ORDERED)


def version_columns(table: pa.Table) -> list[str] | None:
    """Each row's version from the manifest's own columns, in identity.version_of's terms; None if it has none."""
    etag = column(table, ETAG, pa.string())
    if etag is not None:
        return ["etag:" + e.strip('"') if e else "missing" for e in etag.to_pylist()]
    size, mtime = column(table, SIZE, pa.int64()), column(table, MTIME, pa.string())
    if size is None and mtime is None:
        return None
    n = table.num_rows
    return [f"size:{s}:mtime:{m}" for s, m in zip(*(c.to_pylist() if c is not None else [None] * n
                                                     for c in (size, mtime)))]


def column(table: pa.Table, names: tuple[str, ...], to: pa.DataType) -> pa.Array | None:
    by_norm = {norm(c): c for c in table.column_names}
    for n in names:
        if n in by_norm:
            col = table[by_norm[n]]
            return pc.cast(col, to).combine_chunks() if not pa.types.is_timestamp(col.type) or to != pa.string() \
                else pc.cast(pc.cast(col, pa.timestamp("ms", tz="UTC")), pa.string()).combine_chunks()
    return None


def strings(table: pa.Table, name: str) -> pa.Array:
    """A label or split column as text; a float column's NaN is no value, as a null is."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.string())
    col = table[name].combine_chunks()
    if pa.types.is_floating(col.type):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        # 3.0 is the class "3", as the same column written as integers would be.
        whole = pc.fill_null(pc.equal(col, pc.floor(col)), False)
        col = pc.if_else(whole, pc.cast(pc.cast(col, pa.int64(), safe=False), pa.string()), pc.cast(col, pa.string()))
    return pc.cast(col, pa.string())


def check_types(table: pa.Table, uri: str) -> None:
    """uri is text; label and split are text or numbers, one value a row: said before any row is used."""
    def text(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)

    kinds = {"uri": text} | dict.fromkeys(TEXT[1:], lambda t: text(t) or pa.types.is_integer(t)
                                           or pa.types.is_floating(t) or pa.types.is_null(t))
    for name, ok in kinds.items():
        if name in table.column_names and not ok(table.schema.field(name).type):
            what = "the image's URI as text" if name == "uri" else "one class name (text or a number) a row"
            raise SourceError(f"manifest {uri}: column {name!r} is {table.schema.field(name).type}; it must hold "
                              f"{what}. Rewrite the column, or rename it if it holds something else")


# --- S3 Inventory ------------------------------------------------------------------------------------

def inventory(cfg: SourceConfig, storage_options: dict | None) -> tuple[list[str], dict]:
    """An S3 Inventory report's data files (URIs) and how to read them, from its manifest.json."""
    loc = storage.locate(cfg.uri, storage_options)
    if not loc.path.endswith(".json"):
        raise SourceError(f"source.uri {cfg.uri}: an s3_inventory source is the report's manifest.json "
                          f"(…/<date>/manifest.json, which names its data files)")
    try:
        report = json.loads(loc.fs.cat_file(loc.path))
    except FileNotFoundError:
        raise SourceError(f"source.uri {cfg.uri} does not exist") from None
    except ValueError as e:
        raise SourceError(f"source.uri {cfg.uri} is not an S3 Inventory manifest.json ({e})") from None
    missing = [k for k in ("sourceBucket", "fileFormat", "fileSchema", "files") if k not in report]
    if missing:
        raise SourceError(f"source.uri {cfg.uri} is not an S3 Inventory manifest.json: it lacks {missing}")
    fmt = report["fileFormat"].lower()
    if fmt not in ("csv", "parquet", "orc"):
        raise SourceError(f"{cfg.uri}: inventory format {report['fileFormat']!r}; ftl reads CSV, Parquet and ORC")
    dest = report.get("destinationBucket", "").removeprefix("arn:aws:s3:::") or loc.path.split("/", 1)[0]
    files = [f"s3://{dest}/{f['key']}" for f in report["files"]]
    root = cfg.root or f"s3://{report['sourceBucket']}"
    if not root.startswith(f"s3://{report['sourceBucket']}"):
        raise SourceError(f"source.root {root} is not in the inventory's bucket s3://{report['sourceBucket']}")
    how = {"format": fmt, "columns": [c.strip() for c in report["fileSchema"].split(",")],
           "bucket": report["sourceBucket"], "prefix": storage.strip_scheme(root).split("/", 1)[1:] or [""],
           "extensions": [e.lower() for e in cfg.extensions]}
    how["prefix"] = how["prefix"][0].strip("/")
    return files, how


def read_inventory_file(uri: str, index: int, how: dict, storage_options: dict | None) -> pa.Table:
    """One inventory data file as ORDERED rows: the current objects under the root with an image extension."""
    loc = storage.locate(uri, storage_options)
    with loc.fs.open(loc.path, "rb", compression="gzip" if how["format"] == "csv" else None) as f:
        if how["format"] == "csv":  # no header; every value a string, keys URL-encoded
            opts = pacsv.ReadOptions(column_names=how["columns"])
            table = pacsv.read_csv(f, read_options=opts, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in how["columns"]}))
        elif how["format"] == "parquet":
            table = pq.read_table(f)
        else:
            import pyarrow.orc as orc

            table = orc.read_table(f)
    cols = {norm(c): c for c in table.column_names}
    keys = table[cols["key"]].to_pylist()
    if how["format"] == "csv":
        keys = [unquote_plus(k) for k in keys]
    keep = np.ones(len(keys), dtype=bool)
    for flag, want in (("islatest", "true"), ("isdeletemarker", "false")):
        if flag in cols:
            keep &= np.array([str(v).lower() == want for v in table[cols[flag]].to_pylist()], dtype=bool)
    prefix, exts = how["prefix"], tuple(how["extensions"])
    inside = f"{prefix}/" if prefix else ""
    keep &= np.array([k.startswith(inside) and k.lower().endswith(exts) for k in keys], dtype=bool)
    rows = np.flatnonzero(keep)
    etags = table[cols["etag"]].to_pylist() if "etag" in cols else [None] * len(keys)
    sizes = table[cols["size"]].to_pylist() if "size" in cols else [None] * len(keys)
    ids, uris, labels, splits = [], [], [], []
    for i in rows:
        uri_i = f"s3://{how['bucket']}/{keys[i]}"
        parts = keys[i][len(inside):].split("/")
        ids.append(identity.image_id(uri_i, f"etag:{etags[i].strip(chr(34))}" if etags[i] else "missing"))
        uris.append(uri_i)
        labels.append(parts[-2] if len(parts) >= 2 else None)
        splits.append(parts[-3] if len(parts) >= 3 else None)
    return pa.table({"image_id": ids, "uri": uris, "label": labels, "split": splits,
                     "size": pa.array([int(sizes[i]) if sizes[i] not in (None, "") else None for i in rows],
                                      pa.int64()),
                     "_order": (np.int64(index) << 32) + rows.astype(np.int64)}, schema=ORDERED)


def dataset(cfg: SourceConfig, storage_options: dict | None):
    """The source's rows as a Ray Dataset (ORDERED schema), one read task per manifest or inventory file."""
    import ray.data

    if cfg.format == "s3_inventory":
        files, how = inventory(cfg, storage_options)
        read_one = lambda uri, i: read_inventory_file(uri, i, how, storage_options)  # noqa: E731
    else:
        files = manifest_files(cfg, storage_options)
        read_one = lambda uri, i: read_manifest_file(uri, i, storage_options)  # noqa: E731

    def read(batch: pa.Table) -> pa.Table:
        return pa.concat_tables([read_one(u, i) for u, i in zip(batch["uri"].to_pylist(), batch["index"].to_pylist())])

    items = ray.data.from_items([{"uri": u, "index": i} for i, u in enumerate(files)],
                                override_num_blocks=len(files))
    return items.map_batches(read, batch_size=1, batch_format="pyarrow"), len(files)
