"""The fine-tuning data: the probe's images and splits, streamed through Ray Data into Ray Train workers.

The rows are the features' own (image_id, uri, label, split) with the very split rule the probe
was trained and evaluated with (ftl.fitting.features.assign_splits), so the probe's metrics and the
fine-tuned model's are on the same images. Images are read and decoded by extract's reader tasks
(ftl.pipeline.readers, on CPU). With `cache_prefix`, extract's plan (ftl.pipeline.plan) also runs
the frozen prefix once in its actor pool, and its fp16 output at the cut is kept in the object
store: every epoch then streams that instead of pixels.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ftl.config import PipelineConfig, TrainConfig
from ftl.finetune import network
from ftl.finetune.job import NetSpec
from ftl.fitting import features
from ftl.io import schema
from ftl.model import imaging
from ftl.pipeline import plan, readers, tuning
from ftl.pipeline.runtime import ModelActor

# What each worker reads per row: the image (or the prefix's output), its label, and whether it was readable.
PIXELS, CUT = "pixels", "cut"


def split_rows(uri: str, *, train: TrainConfig, shuffle_seed: int, storage_options: dict | None) -> dict[str, pa.Table]:
    """The labelled rows of the features at `uri` per split, as the probe saw them; train rows in a seeded order."""
    _, dt = features.open_table(uri, storage_options)
    # In listing (URI) order: the order in which parts were committed must not change what is trained.
    rows = dt.to_pyarrow_dataset().to_table(columns=list(schema.PASSTHROUGH)).sort_by("uri")
    rows = rows.filter(pc.is_valid(rows["label"]))
    names = np.array(sorted(pc.unique(rows["label"]).to_pylist()), dtype=object)
    index = np.searchsorted(names, np.array(rows["label"].to_pylist(), dtype=object))
    where = features.assign_splits(rows, index, val_fraction=train.val_fraction, test_fraction=train.test_fraction,
                                   seed=train.seed).assigned
    out = {s: rows.filter(pa.array(where == s)) for s in features.SPLITS}
    # Listings come sorted by URI, i.e. by class: permuted once here, shuffled locally per epoch by the workers.
    out["train"] = out["train"].take(np.random.default_rng(shuffle_seed).permutation(out["train"].num_rows))
    return out


def decoded(rows: pa.Table, *, pre: imaging.Preprocess, pipeline: PipelineConfig, storage_options: dict | None):
    """Rows → pixels in Ray Data CPU tasks (extract's decoder), block by block in the rows' order."""
    return plan.blocks(rows, rows=pipeline.decode_batch_size).map_batches(
        readers.decode_batch, batch_size=pipeline.decode_batch_size, batch_format="pyarrow",
        num_cpus=pipeline.decode_cpus, fn_kwargs={"pre": pre, "max_pixels": pipeline.max_image_pixels,
                                                  "storage_options": storage_options or None,
                                                  "max_bytes": pipeline.max_image_bytes})


class Prefix(ModelActor):
    """Decoded batches → the frozen prefix's output at the cut, fp16; unreadable rows keep zeros and their error."""

    def __init__(self, spec: NetSpec, states: dict, *, runtime: tuning.Runtime, pre: imaging.Preprocess,
                 progress=None):
        super().__init__(runtime, pre=pre, progress=progress)
        self.net = network.build(spec, states, inputs=PIXELS).to(self.device).eval()
        with torch.inference_mode():
            self.shape = tuple(self.net.prefix(torch.zeros(1, pre.crop, pre.crop, 3, dtype=torch.uint8,
                                                           device=self.device)).shape[1:])

    def forward(self, pixels) -> np.ndarray:
        x, n = self.inputs(pixels)
        with torch.inference_mode(), self.autocast():
            return self.net.prefix(x)[:n].half().cpu().numpy()

    def rows(self, batch: dict, out, ok: np.ndarray, stage: np.ndarray, error: np.ndarray) -> pa.Table:
        from ray.data.extensions import ArrowTensorArray

        cut = np.zeros((len(ok), *self.shape), dtype=np.float16)
        if out is not None:
            cut[ok] = out
        return pa.table({"image_id": pa.array(batch["image_id"], pa.string()),
                         "label": pa.array(batch["label"], pa.string()), CUT: ArrowTensorArray.from_numpy(cut),
                         "error": pa.array(error, pa.string())})


def cached(rows: pa.Table, *, spec: NetSpec, states: dict, pre: imaging.Preprocess, pipeline: PipelineConfig,
           storage_options: dict | None):
    """Rows → the prefix's output, computed once by extract's plan and held in the object store.

    The pass shows its own progress line (`finetune: caching the frozen prefix: 1,200/5,000 images`):
    on a big split it is minutes before the first epoch.
    """
    from ftl.pipeline.progress import Progress

    tuned = tuning.settings_for(pipeline, tuning.Hardware.of_cluster(), crop=pre.crop)
    with Progress("finetune: caching the frozen prefix", total=rows.num_rows) as progress:
        ds = plan.build(plan.blocks(rows, rows=tuned.reader_batch_size), actor=Prefix, pre=pre, tuned=tuned,
                        actor_kwargs={"spec": spec, "states": states, "runtime": tuned.runtime, "pre": pre},
                        storage_options=storage_options, progress=progress.handle)
        ds.context.execution_options = ordered(ds.context.execution_options)
        return ds.materialize()


def ordered(options):
    """A copy of Ray Data's execution options that keeps rows in order: same order, same minibatches, same model."""
    options = copy.copy(options)
    options.preserve_order = True
    return options


def datasets(rows: dict[str, pa.Table], *, net: tuple[NetSpec, dict] | None, pre: imaging.Preprocess, pipeline: PipelineConfig,
             storage_options: dict | None) -> tuple[dict, str]:
    """One Ray Dataset per split and the column the workers read: the prefix's output given `net`, else pixels."""
    if net is None:
        streamed = {s: decoded(t, pre=pre, pipeline=pipeline, storage_options=storage_options) for s, t in rows.items()}
        return streamed, PIXELS
    # One pass of one actor pool over every split, cut back into splits by position (the order is kept).
    whole = cached(pa.concat_tables(rows.values()), spec=net[0], states=net[1], pre=pre, pipeline=pipeline,
                   storage_options=storage_options)
    ends = np.cumsum([t.num_rows for t in rows.values()])[:-1].tolist()
    return dict(zip(rows, whole.split_at_indices(ends))), CUT


def batch_tensors(batch: dict, *, column: str, classes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A numpy batch → its readable rows' inputs and class indices, and how many rows were unreadable."""
    ok = batch["error"] == schema.ERROR_NONE
    y = np.searchsorted(classes, batch["label"][ok].astype(object))
    return torch.from_numpy(np.ascontiguousarray(batch[column][ok])), torch.from_numpy(y), int((~ok).sum())


def augmenter(size: int, scale: tuple[float, float], which: list[str]):
    """The named augmentations (finetune.augment) on one CHW uint8 image: random resized crop (area in `scale`),
    horizontal flip."""
    from torchvision.transforms import v2

    made = {"crop": lambda: v2.RandomResizedCrop(size, scale=scale, antialias=True), "flip": v2.RandomHorizontalFlip}
    return v2.Compose([made[name]() for name in which])


def augment(images: torch.Tensor, transform, *, seed: int) -> torch.Tensor:
    """Each NHWC image its own crop and flip, drawn from `seed`: a rerun draws the same ones."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(img.permute(2, 0, 1)).permute(1, 2, 0) for img in images])
