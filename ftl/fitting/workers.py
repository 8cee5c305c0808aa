"""The Ray Train plumbing that heads and fine-tuning share: the device, reductions, and where checkpoints go."""

from __future__ import annotations

import torch

from ftl.io import storage


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Across the worker group when there is one; a lone worker (or a plain process) keeps its value."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return value


def use_gpu(setting: bool | str) -> bool:
    """`use_gpu: auto` is whether the cluster has a GPU at all (this machine, where no Ray was needed)."""
    if isinstance(setting, bool):
        return setting
    from ftl.pipeline import ray_session

    if not ray_session.started():
        return torch.cuda.is_available()
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def torch_config(gpu: bool):
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if gpu else "gloo")


def run_config(*, name: str, storage_path: str, storage_options: dict | None, max_failures: int):
    """Checkpoints under `storage_path` (local or s3://) as Ray Train wants them: a pyarrow filesystem and a path.

    A worker lost mid-fit (its node gone, killed for memory) restarts the worker group from the
    last checkpoint, `max_failures` times; only the kept state is checkpointed.
    """
    import ray.train
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    loc = storage.locate(storage_path, storage_options)
    return loc, ray.train.RunConfig(
        name=name, storage_path=loc.path, storage_filesystem=PyFileSystem(FSSpecHandler(loc.fs)),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        failure_config=ray.train.FailureConfig(max_failures=max_failures))


def ingest_options(*, preserve_order: bool = False):
    """Ray Train's ingest options: what DataConfig.default_ingest_options() carries over from the DataContext,
    built here because that function passes the deprecated exclude_resources on, and Ray warns of it."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, verbose_progress=current.verbose_progress,
                            preserve_order=preserve_order or current.preserve_order)
