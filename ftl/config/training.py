"""Workflow sections of the training stages: `train:` and `sweep:`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftl.config.base import Strict
from ftl.config.pipeline import Pooling, PreprocessConfig


class TrainConfig(Strict):
    features: str | None = Field(default=None, description="feature table; default: <extract.output>/features")
    features_version: int | None = Field(default=None, ge=0, description="train on this version of the feature table "
                                         "(see `ftl versions`); default: the latest")
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


class SweepBackbone(Strict):
    backbone: str
    weights: str = "DEFAULT"
    pooling: Pooling | None = Field(default=None, description="empty: extract.pooling")
    preprocess: PreprocessConfig | None = Field(default=None, description="empty: extract.preprocess")
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
