"""Workflow sections every stage shares: where the images are, how to reach storage, where to track."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ftl.config.base import Strict


class SourceConfig(Strict):
    uri: str
    format: Literal["imagefolder", "manifest", "webdataset", "s3_inventory"] = "imagefolder"
    extensions: list[str] = [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"]
    limit: int | None = Field(default=None, ge=1, description="a trial run on N images: a deterministic sample "
                              "that keeps every split's and class's share (ftl.sources.sample)")
    # WebDataset: which member holds the image (first found) and which the label.
    image_keys: list[str] = ["jpg", "jpeg", "png", "webp"]
    label_key: str | None = "cls"
    listing: Literal["auto", "driver", "distributed"] = Field(
        default="auto", description="distributed: Ray tasks list the source (a task per folder, or per manifest "
        "file), and the diff against the output is a Ray Data join, so the driver holds counts, not rows. "
        "auto: distributed for s3_inventory and for a manifest of many files (a folder or a glob)")
    root: str | None = Field(default=None, description="s3_inventory: the images' folder inside the inventoried "
                             "bucket (s3://bucket/prefix), laid out as an imagefolder; default: the bucket")

    @model_validator(mode="after")
    def _listing_fits_format(self):
        if self.format == "s3_inventory" and self.listing == "driver":
            raise ValueError("an s3_inventory source is read by Ray tasks: set source.listing to auto or distributed")
        if self.format == "webdataset" and self.listing == "distributed":
            raise ValueError("a webdataset source is listed by its shards: set source.listing to auto")
        if self.root is not None and self.format != "s3_inventory":
            raise ValueError("source.root is for format: s3_inventory (the images' folder in the inventoried bucket)")
        return self


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
