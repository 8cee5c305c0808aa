"""The extract ⇄ train contract: Arrow schemas of the feature and quarantine tables."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

METADATA_KEY = b"ftl"
FORMAT_VERSION = 1

# Folders of an output: one row per image in exactly one of them (or in neither: not done yet).
FEATURES = "features"
QUARANTINE_FOLDER = "quarantine"

# Columns every stage carries through unchanged, from the listing to the output and quarantine.
PASSTHROUGH = ("image_id", "uri", "label", "split")

# Row status between stages: `stage` names where a row failed (read, decode, ...) and `error` why;
# ERROR_NONE ("") marks a good row (all-None object columns do not survive Ray's numpy→Arrow
# conversion), STAGE_DONE a row already in the output, carried only to be counted, and
# STAGE_RETRY a row that failed for a reason that passes (a timeout, throttling): it is written
# nowhere, so the next run tries it again.
ERROR_NONE = ""
STAGE_DONE = "done"
STAGE_RETRY = "retry"

BASE = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("split", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]

QUARANTINE = pa.schema(
    [*BASE[:4], pa.field("stage", pa.string(), nullable=False), pa.field("error", pa.string(), nullable=False)]
)

# What identifies a feature set: rows from two sets never mix in one output.
IDENTITY = ("backbone", "weights", "layers", "preprocess", "feature_dtype")


def column(layer: str) -> str:
    """Column name of a tapped layer; dots would read as struct access in Spark and SQL."""
    return "feat_" + layer.replace(".", "_")


@dataclass(frozen=True)
class Layer:
    """One tapped layer: its name in the backbone, its column, its pooled dim."""

    name: str
    column: str
    dim: int
    pooling: str


@dataclass(frozen=True)
class WeightsId:
    """Which weights made the features: what the user named, how it was found, and its bytes' sha256."""

    id: str
    kind: str
    sha256: str | None


@dataclass(frozen=True)
class Provenance:
    """What produced a feature set. Stored as JSON (the table's description, the Parquet metadata,
    an image model's ftl_model.json) and read back into this at the boundary (`of`)."""

    backbone: str
    weights: WeightsId
    layers: tuple[Layer, ...]
    preprocess: dict  # ftl.model.imaging.Preprocess's fields: resize, crop, mean, std
    feature_dtype: str
    feature_set: str
    versions: dict = field(default_factory=dict)  # ftl, torch, torchvision that made it
    format: int = FORMAT_VERSION

    @classmethod
    def of(cls, stored: dict | Provenance) -> Provenance:
        if isinstance(stored, Provenance):
            return stored
        w = stored["weights"]
        return cls(backbone=stored["backbone"], weights=WeightsId(w["id"], w["kind"], w.get("sha256")),
                   layers=tuple(Layer(l["name"], l["column"], l["dim"], l["pooling"]) for l in stored["layers"]),
                   preprocess=dict(stored["preprocess"]), feature_dtype=stored["feature_dtype"],
                   feature_set=stored["feature_set"], versions=dict(stored.get("versions", {})),
                   format=stored.get("format", FORMAT_VERSION))

    def to_dict(self) -> dict:
        """The stored form, key for key what `provenance` has always written."""
        return asdict(self) | {"layers": [asdict(l) for l in self.layers]}

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]


def provenance(*, backbone: str, weights: dict, layers: list[dict], preprocess: dict,
               feature_dtype: str) -> Provenance:
    """What produced the features; stored as JSON in the Parquet schema metadata."""
    import torch
    import torchvision

    from ftl import __version__

    prov = {
        "format": FORMAT_VERSION,
        "backbone": backbone,
        "weights": {"id": weights["id"], "kind": weights["kind"], "sha256": weights["sha256"]},
        "layers": layers,
        "preprocess": preprocess,
        "feature_dtype": feature_dtype,
        "versions": {"ftl": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    return Provenance.of({**prov, "feature_set": feature_set_id(prov)})


def feature_set_id(prov: dict) -> str:
    identity = {k: prov[k] for k in IDENTITY}
    identity["weights"] = {"sha256": prov["weights"]["sha256"], "id": prov["weights"]["id"]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def differences(a: dict, b: dict) -> list[str]:
    """Which identity fields two provenances disagree on."""
    return [k for k in IDENTITY if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def features(prov: Provenance | dict) -> pa.Schema:
    """Base columns plus one fixed_size_list column per tapped layer, provenance in metadata."""
    prov = Provenance.of(prov)  # as stored (a table's description) or typed
    value = pa.float16() if prov.feature_dtype == "float16" else pa.float32()
    fields = [*BASE] + [pa.field(l.column, pa.list_(value, l.dim)) for l in prov.layers]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(prov.to_dict(), sort_keys=True).encode()})

