"""Reading features for training: one layer's column, labels and splits, with the provenance checked."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ftl.config import Workflow
from ftl.errors import FeatureError
from ftl.io import legacy, schema, storage, table

SPLITS = ("train", "val", "test")


@dataclass
class FeatureData:
    """Arrays per split, the label vocabulary, and where they came from."""

    uri: str
    provenance: schema.Provenance
    layer: schema.Layer
    classes: list[str]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    split_source: str  # "column", "hash" or "column+hash"
    files: list[str] = field(default_factory=list)
    carved: list[str] = field(default_factory=list)  # splits the column lacked, carved from train
    unsplit: int = 0  # rows without a train/val/test value, placed by the hash rule
    version: int | None = None  # the feature table's version these rows were read at

    def rows(self, split: str) -> int:
        return len(self.y[split])

    @property
    def digest(self) -> str:
        """Changes whenever the table's files (at the version read) or the feature set change."""
        h = hashlib.sha256(self.provenance.feature_set.encode())
        for f in sorted(self.files):
            h.update(f.encode())
        return h.hexdigest()[:16]


def uri_of(wf: Workflow) -> str:
    """Where the workflow's features are: train.features, else the folder extract writes under extract.output."""

    return wf.train.features or storage.locate(wf.extract.output, wf.storage.options).join(schema.FEATURES).uri


def open_table(uri: str, storage_options: dict | None, *, version: int | None = None):
    """The feature table at `uri` (at `version`), with errors that say what to run."""
    loc = storage.locate(uri, storage_options)
    t = table.Table.at(loc)
    if not t.exists():
        if legacy.old_parts(t):
            raise FeatureError(f"{loc.uri} holds features written by an older ftl as plain Parquet; run `ftl extract` "
                               f"on its workflow once (nothing new is extracted) to convert it into a table in "
                               f"place, keeping every row")
        raise FeatureError(f"no feature table at {loc.uri}; run `ftl extract` first (or set train.features)")
    try:
        return t, t.open(version)
    except Exception as e:
        if version is None:
            raise
        raise FeatureError(f"train.features_version: {loc.uri} has no version {version} ({e}); its versions: "
                           f"`ftl versions {loc.uri}`") from None


def provenance(dt) -> schema.Provenance:
    """What the table's rows hold: the description its first run wrote."""
    prov = json.loads(dt.metadata().description or "{}")
    if "feature_set" not in prov:
        raise FeatureError(f"{dt.table_uri} is not an ftl feature table (its description holds no provenance)")
    return schema.Provenance.of(prov)


def pick_layer(prov: schema.Provenance, name: str | None, uri: str) -> schema.Layer:
    names = prov.layer_names
    if name is None:
        return prov.layers[0]
    for layer in prov.layers:
        if name in (layer.name, layer.column):
            return layer
    raise FeatureError(
        f"train.layer: {name!r} is not in the features at {uri}; extracted layers: {', '.join(names)} "
        f"(add it to extract.layers and rerun ftl extract, or pick one of these)"
    )


def load(uri: str, *, layer: str | None, val_fraction: float, test_fraction: float, seed: int = 0,
         storage_options: dict | None = None, version: int | None = None) -> FeatureData:
    """Read the labelled rows of one layer (at a table version, or the latest) and assign each to train, val or test."""
    loc = storage.locate(uri, storage_options)
    _, dt = open_table(uri, storage_options, version=version)
    prov = provenance(dt)
    chosen = pick_layer(prov, layer, loc.uri)
    columns = ["image_id", "label", "split", chosen.column]
    parts = dt.get_add_actions(flatten=True).column("path").to_pylist()
    # In listing (URI) order: the order in which parts were committed must not change what is trained.
    table = dt.to_pyarrow_dataset().to_table(columns=columns + ["uri"]).sort_by("uri").select(columns)
    table = table.filter(pc.is_valid(table["label"]))
    if table.num_rows == 0:
        raise FeatureError(f"features at {loc.uri} have no labelled rows; training needs a label per image")
    classes = sorted(pc.unique(table["label"]).to_pylist())
    if len(classes) < 2:
        raise FeatureError(f"features at {loc.uri} hold a single class {classes}; a classifier needs two or more")
    labels = np.searchsorted(np.array(classes, dtype=object), np.array(table["label"].to_pylist(), dtype=object))
    splits = assign_splits(table, labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    x = to_matrix(table[chosen.column], chosen.dim)
    data = FeatureData(uri=loc.uri, provenance=prov, layer=chosen, classes=classes, x={}, y={},
                       split_source=splits.source, files=parts, carved=splits.carved, unsplit=splits.unsplit,
                       version=dt.version())
    for name in SPLITS:
        mask = splits.assigned == name
        data.x[name], data.y[name] = x[mask], labels[mask].astype(np.int64)
    empty = [s for s in SPLITS if data.rows(s) == 0]
    if empty:
        raise FeatureError(f"split(s) {empty} are empty in {loc.uri}; add images or change train.*_fraction")
    return data


def to_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """fixed_size_list<float>[dim] → (N, dim) float32, without a Python loop."""
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(np.float32, copy=False)


def unit_hash(ids: list[str], seed: int) -> np.ndarray:
    """A deterministic number in [0, 1) per id."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") / 2**64 for i in ids]
    )


class Splits(NamedTuple):
    """Each row's split, and how the splits were made: what the hash rule had to decide."""

    assigned: np.ndarray
    source: str  # "column", "hash" or "column+hash"
    carved: list[str]  # splits the column lacked, carved from train
    unsplit: int  # rows the column gave no train/val/test value, placed by the hash rule


def assign_splits(table: pa.Table, labels: np.ndarray, *, val_fraction: float, test_fraction: float,
                  seed: int) -> Splits:
    """The `split` column where it names train/val/test; otherwise a stratified hash split."""
    # A split missing from the column (often val) is carved from train with the same hash rule.
    given = np.array([s if s in SPLITS else "" for s in table["split"].to_pylist()], dtype=object)
    u = unit_hash(table["image_id"].to_pylist(), seed)
    if (given == "").all():
        return Splits(stratified(u, labels, np.ones(len(u), bool), val_fraction, test_fraction), "hash", [], len(u))
    out = given.copy()
    unassigned = given == ""
    if unassigned.any():
        out[unassigned] = stratified(u, labels, unassigned, val_fraction, test_fraction)[unassigned]
    carve = {s: f for s, f in (("test", test_fraction), ("val", val_fraction)) if not (out == s).any()}
    for split, fraction in carve.items():
        pool = out == "train"
        cut = stratified(u, labels, pool, fraction if split == "val" else 0.0, fraction if split == "test" else 0.0)
        out[pool & (cut != "train")] = split
    source = "column" if not (unassigned.any() or carve) else "column+hash"
    return Splits(out, source, list(carve), int(unassigned.sum()))


def stratified(u: np.ndarray, labels: np.ndarray, pool: np.ndarray, val_fraction: float,
               test_fraction: float) -> np.ndarray:
    """Within each class of `pool`, the rows with the lowest hashes go to test, then val."""
    out = np.full(len(u), "", dtype=object)
    for c in np.unique(labels[pool]):
        idx = np.flatnonzero(pool & (labels == c))
        idx = idx[np.argsort(u[idx], kind="stable")]
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
        out[idx[n_test + n_val :]] = "train"
    return out
