"""Workflow section of `ftl finetune`: which blocks of the backbone train, how, and on what hardware."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ftl.config.base import Strict

# One block ("features.14"), or an inclusive range of blocks: "features.14:", ":layer3", "features.12:features.15".
BLOCK_RANGE = re.compile(r"^[A-Za-z0-9_.]*(:[A-Za-z0-9_.]*)?$")


class FinetuneConfig(Strict):
    """`finetune:` LP-FT from the best linear probe of the features, on Ray Train; unset keys have working defaults."""

    probe: str | None = Field(default=None, description="models:/<name>/<version> (or @champion) of the probe's "
                              "image model to start from; default: the best linear probe on val for these features, fitted first if none")
    blocks: str | list[str] | None = Field(
        default=None, description="blocks that train: 'features.14:' (inclusive range), a list, or 'auto' (tries "
        "auto_candidates ranges, keeps the best on val); default: the blocks after the layer the sweep chose, "
        "else the last stage feeding the head's layer")
    auto_candidates: list[Literal["last_stage", "last_two_stages", "first_stage", "all"]] = Field(
        default_factory=lambda: ["last_stage", "last_two_stages", "first_stage"], min_length=1,
        description="the ranges blocks=auto tries, each trained in full")
    # LP-FT wants small steps: the head starts trained, and AdamW moves every weight by about the lr per step.
    lr: float = Field(default=3e-4, gt=0, description="the head's learning rate")
    backbone_lr: float = Field(default=1e-4, gt=0, description="the top trained block's lr")
    layer_decay: float | None = Field(default=None, gt=0, le=1, description="each block below the top one trains "
                                      "at this factor of the block above's lr (timm's layer decay; MAE: 0.65-0.75)")
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW's decoupled decay: weights, not biases or norms")
    freeze_bn: bool = Field(default=True, description="BatchNorm keeps its running statistics and affine parameters")
    # One by one: a flip changes the label of a digit or a letter, so it is never implied.
    augment: list[Literal["crop", "flip"]] = Field(default=["crop"], description="train-image augmentations: crop "
                                                   "(random resized crop), flip (horizontal, only where a mirrored "
                                                   "image keeps its label); true: [crop]; false: none")
    # Light: on shifted Fashion-MNIST, LP-FT of the last stage gained 1.1 test points with (0.5, 1) and 4.1 with
    # (0.8, 1) in the same 10 epochs (benchmarks/finetune_gain.py); a short schedule cannot absorb heavy crops.
    crop_scale: tuple[float, float] = Field(default=(0.8, 1.0), description="random resized crop's area range")
    epochs: int = Field(default=10, ge=1)
    warmup_epochs: int = Field(default=1, ge=0, description="linear lr warmup before the cosine decay: AdamW's first "
                               "steps move every weight by about the lr, which distorts pretrained blocks")
    # 3 stopped the top blocks at their starting point on held-back digits, where 10 reached the best model of all.
    patience: int = Field(default=10, ge=1, description="epochs without a better val epoch (by `monitor`) before "
                          "stopping (the best epoch is kept either way)")
    # Accuracy, as the choice between candidates and the probe is made (paired val accuracy): by val loss, an
    # epoch that got more images right but grew more confident on the rest was never kept.
    monitor: Literal["accuracy", "loss"] = Field(default="accuracy", description="which val epoch a candidate keeps: "
                                                 "the highest val accuracy (its lower loss breaking ties) or the "
                                                 "lowest val loss")
    batch_size: int = Field(default=64, ge=1, description="global: split across workers")
    workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP: gloo on CPU, NCCL on GPUs)")
    use_gpu: Literal["auto"] | bool = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 autocast on GPUs")
    torch_threads: int | None = Field(default=None, ge=1, description="per CPU worker; default: the node's cores "
                                      "divided among its workers")
    cache_prefix: bool = Field(default=False, description="run the frozen prefix once (Ray Data actors) and keep its "
                               "output at the cut in the object store as fp16; epochs then skip the frozen blocks. "
                               "Needs augment: false")
    shuffle_buffer: int = Field(default=1024, ge=1, description="rows each worker shuffles per epoch (rows are also "
                                "permuted once, seeded, before the first epoch)")
    max_failures: int = Field(default=2, ge=0, description="worker failures retried from the last checkpoint")
    checkpoints: str | None = Field(default=None, description="Ray Train storage, local or s3://; "
                                    "default: <extract.output>/finetune. A killed run resumes from it")
    seed: int = 0
    margin_se: float = Field(default=2.0, ge=0, description="a candidate replaces the probe only if it beats it on val "
                             "by this many paired standard errors (ftl.finetune.selection); 0: any gain")
    budget_minutes: float | None = Field(default=None, gt=0, description="training time for all candidates together: "
                                         "an epoch that would end past it is not started, and the candidates after it "
                                         "are skipped (said in the summary); default: no limit")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, v):
        if isinstance(v, bool):
            return ["crop"] if v else []
        return [v] if isinstance(v, str) else v

    @field_validator("blocks", mode="before")
    @classmethod
    def _open_range(cls, v):
        # YAML reads an unquoted `features.14:` (and --set finetune.blocks=features.14:) as {features.14: None}.
        if isinstance(v, dict) and len(v) == 1 and next(iter(v.values())) is None:
            return f"{next(iter(v))}:"
        return v

    @field_validator("blocks")
    @classmethod
    def _range_syntax(cls, v):
        if isinstance(v, str) and v != "auto" and not BLOCK_RANGE.match(v):
            raise ValueError("give one block (features.14), an inclusive range (features.12:features.15, "
                             "features.14:, :layer3), a list of blocks, or auto")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale_order(cls, v):
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("needs 0 < low <= high <= 1")
        return v
