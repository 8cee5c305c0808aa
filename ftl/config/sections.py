"""Workflow sections every stage shares: where the images are, how to reach storage, where to track."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ftl.config.base import Strict


class SourceConfig(Strict):
    uri: str
    format: Literal["imagefolder", "manifest", "webdataset"] = "imagefolder"
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"]
    limit: int | None = Field(default=None, ge=1, description="a trial run on N images: a deterministic sample "
                              "that keeps every split's and class's share (ftl.sources.sample)")
    # WebDataset: which member holds the image (first found) and which the label.
    image_keys: list[str] = ["jpg", "jpeg", "png", "webp"]
    label_key: str | None = "cls"


class StorageConfig(Strict):
    # Passed to the filesystem (s3fs for s3://); when empty, the standard AWS_* environment applies.
    options: dict[str, Any] = {}
    # One writer per output (ftl.io.lease): a run that dies frees its output after lease_ttl.
    lease_ttl: float = Field(default=60.0, ge=2, description="seconds a lease lives unless its run renews it")
    lease_wait: float = Field(default=0.0, ge=0, description="seconds to wait for an output another run holds; "
                              "0: fail at once, naming the holder")


class TrackingConfig(Strict):
    uri: str | None = Field(default=None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str | None = Field(default=None, description="default: the workflow name")
    registered_model: str | None = Field(default=None, description="default: the workflow name")
    system_metrics: bool = True
