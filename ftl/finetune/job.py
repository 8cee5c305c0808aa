"""What the driver hands fine-tuning's workers and prefix actors: typed values, not dicts of keys."""

from __future__ import annotations

from dataclasses import dataclass

from ftl.config import FinetuneConfig


@dataclass(frozen=True)
class NetSpec:
    """The network to fine-tune: the probe's backbone and head, its layer, and where the frozen prefix ends."""

    backbone: str  # a model name ftl.model.backbones builds
    head: dict  # ftl.model.heads.build's config of the probe's head
    cut: str | None  # graph node whose output the trained suffix starts from; None: the image itself
    node: str  # graph node of the probe's layer
    pooling: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: int
    freeze_bn: bool


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run as every Ray Train worker receives it (its weights travel apart, by reference)."""

    finetune: FinetuneConfig
    spec: NetSpec
    states: object  # ObjectRef of {"backbone_state", "head_state"}: once through the object store
    candidates: list[list[str]]  # ranges of blocks, trained in turn
    order: list[str]  # the blocks that feed the layer, in depth order
    column: str  # what the workers read: pixels or the cached prefix's output
    classes: list[str]
    rows: int  # train rows, for the schedule
    progress: object  # the Epochs actor (ftl.fitting.live) rank 0 tells, or None
