"""The Ray Data plan every model stage runs: listed rows → reader tasks → a model actor pool → a sink.

Extract runs it with the backbone's Embedder, predict with the registered model's Predictor,
and fine-tuning's data path with its own actor; ftl.pipeline.tuning decides every setting.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pyarrow as pa

from ftl import logs
from ftl.errors import FtlError, chain
from ftl.model import imaging
from ftl.pipeline import readers
from ftl.pipeline.tuning import Tuning

# Tuning.runtime.decode → the reader task: decoded pixels, or JPEG bytes for the actor's device.
READERS = {"cpu": readers.decode_batch, "device": readers.read_batch}
# Ray retries tasks and restarts actors forever by default: a worker that dies on the same image
# every time (an out-of-memory kill) would loop. A few attempts, then the run fails and says so.
TASK_RETRIES = 3
ACTOR_RESTARTS = 3


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
          storage_options: dict | None, progress=None):
    """images (listed rows, or rows with inline bytes) → reader tasks → a pool of `actor(**actor_kwargs)`."""
    from ray.data import ExecutionResources

    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for retries and restarts yet and flags them as deprecated
        # extra arguments; bounded retries matter more than the warning (see TASK_RETRIES).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = readers_then_actors(images, actor=actor, actor_kwargs=actor_kwargs | {"progress": progress}, pre=pre,
                                 tuned=tuned, storage_options=storage_options)
    logs.own_progress(ds.context)
    # A copy: the options object may be shared with DataContext.get_current() and later datasets.
    options = copy.copy(ds.context.execution_options)
    options.resource_limits = ExecutionResources(object_store_memory=tuned.buffer_bytes)
    ds.context.execution_options = options
    return ds


def readers_then_actors(images, *, actor: type, actor_kwargs: dict, pre: imaging.Preprocess, tuned: Tuning,
                        storage_options: dict | None):
    """The two map stages of the plan, with bounded retries and restarts."""
    from ray.data import ActorPoolStrategy

    rt = tuned.runtime
    ds = images.map_batches(
        READERS[rt.decode],
        fn_kwargs={"pre": pre, "max_pixels": rt.max_image_pixels, "max_bytes": tuned.reader_max_bytes,
                   "storage_options": storage_options or None},
        batch_size=tuned.reader_batch_size,
        batch_format="pyarrow",
        num_cpus=tuned.reader_cpus,
        max_retries=TASK_RETRIES,
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
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=TASK_RETRIES,
        **tuned.actor_options,
    )
    return ds


def write(ds, sink) -> None:
    """Run the plan into `sink`; a write task that Ray retries finds its own commit and adds nothing (ftl.io.sink)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
            # Write tasks ask for no CPU: they only encode and commit a part, and with the default
            # one CPU they found none free beside the actors and readers on 2 cores, so every part
            # of a 4.5-minute run was committed in its last 8 s (a killed run kept nothing).
            ds.write_datasink(sink, ray_remote_args={"max_retries": TASK_RETRIES, "num_cpus": 0})
    except Exception as e:
        ours = next((c for c in chain(e) if isinstance(c, FtlError)), None)  # e.g. a lost lease, said plainly
        if ours is not None:
            raise ours from None
        raise FtlError(
            f"the pipeline failed after {TASK_RETRIES} retries of a task (or {ACTOR_RESTARTS} restarts of an "
            f"actor): {type(e).__name__}: {str(e)[:2000]}\nWhat was committed stays; a rerun does only what is "
            f"missing. A worker that dies on the same images each time (killed for memory?) points at an image "
            f"over what a worker can hold: lower extract.max_image_pixels or max_image_bytes.") from e

