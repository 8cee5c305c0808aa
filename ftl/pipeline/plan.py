"""The Ray Data plan every model stage runs: listed rows → reader tasks → a model actor pool → a sink.

Extract runs it with the backbone's Embedder, predict with the registered model's Predictor,
and fine-tuning's data path with its own actor; ftl.pipeline.tuning decides every setting.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pyarrow as pa

from ftl.model import imaging
from ftl.pipeline import readers
from ftl.pipeline.tuning import Tuning

# Tuning.runtime.decode → the reader task: decoded pixels, or JPEG bytes for the actor's device.
READERS = {"cpu": readers.decode_batch, "device": readers.read_batch}


@dataclass
class Tally:
    """What a run did with its listed images: each is already done, written, quarantined, or left for the next run."""

    listed: int
    already_done: int
    ok: int
    quarantined: int
    retry: int  # failed for a reason that passes (a timeout, throttling): the next run tries again
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.ok + self.quarantined) / self.seconds if self.seconds else 0.0

    def tally(self, *, ok_as: str) -> str:
        left = f" + {self.retry} left for the next run" if self.retry else ""
        return (f"listed {self.listed} = {self.already_done} already done + {self.ok} {ok_as} + {self.quarantined} "
                f"quarantined{left}, in {self.seconds:.1f}s ({self.images_per_second:.1f} images/s)")


def blocks(todo: pa.Table, *, rows: int):
    """Listed images as one block per reader batch, so that decoding streams into the model from the first batch."""
    import ray

    return ray.data.from_arrow([todo.slice(i, rows) for i in range(0, todo.num_rows, rows)])


def build(images, *, actor: type, actor_kwargs: dict, pre: imaging.Preprocess, tuned: Tuning,
          storage_options: dict | None):
    """images (listed rows, or rows with inline bytes) → reader tasks → a pool of `actor(**actor_kwargs)`."""
    from ray.data import ActorPoolStrategy, ExecutionResources

    rt = tuned.runtime
    ds = images.map_batches(
        READERS[rt.decode],
        fn_kwargs={"pre": pre, "max_pixels": rt.max_image_pixels, "max_bytes": tuned.reader_max_bytes,
                   "storage_options": storage_options or None},
        batch_size=tuned.reader_batch_size,
        batch_format="pyarrow",
        num_cpus=tuned.reader_cpus,
    )
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=rt.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            size=tuned.actors, max_tasks_in_flight_per_actor=tuned.prefetch_batches,
            max_concurrent_calls_per_actor=tuned.concurrent_batches,
            enable_true_multi_threading=tuned.concurrent_batches > 1,
        ),
        **tuned.actor_options,
    )
    # A copy: the options object may be shared with DataContext.get_current() and later datasets.
    options = copy.copy(ds.context.execution_options)
    options.resource_limits = ExecutionResources(object_store_memory=tuned.buffer_bytes)
    ds.context.execution_options = options
    return ds
