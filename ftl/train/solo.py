"""A small head's whole fit in one Ray task, or in this process: no worker group, no Ray Data pipeline.

A head on features that one worker holds in memory (`memory.decide`), with `train.workers: 1`,
gains nothing from Ray Train's machinery: its controller, worker group, process group and
dataset shards cost about 20 s before the first epoch on 2 cores, while the fit itself takes
seconds. On a cluster, one task, on any node with a CPU (or a GPU), gets the arrays through the
object store, runs the same `worker.train_worker` as rank 0 of 1, and returns the kept head; the
driver writes it where Ray Train would have checkpointed it. A task lost with its node is
retried, as a worker group would be restarted: seeded, the fit comes out the same.

On a local runtime (`here`) the task would run on this machine anyway, and would die with this
process: it buys no placement and no retry, only a worker's start (torch imported again) and
the arrays' trip through the object store, which cost more than the fit on 2 cores (measured:
14.7 s against 5.4 s for the quickstart's five weight decays). So the fit runs in the driver,
and `ftl train` starts no Ray at all.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from ftl import logs
from ftl.io import storage
from ftl.train import memory, worker
from ftl.train.job import HeadJob

CHECKPOINT = "head.pt"


def fit_head(job: HeadJob, x_train, y_train, x_val, y_val, *, gpu: bool, own_progress: bool = True) -> dict:
    """Runs in the task: the fit of `worker.train_worker` on the arrays, its peak memory, the kept head's state."""
    if own_progress:  # a Ray worker's Ray Data bars and lines; the driver's are set already
        logs.own_progress()
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    arrays = {"train": (x_train, y_train), "val": (x_val, y_val)}

    def load(split: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = arrays.pop(split)  # read-only views of the object store's copy: one copy into a tensor
        return (torch.tensor(x, dtype=torch.float32, device=device),
                torch.tensor(y, dtype=torch.long, device=device))

    with memory.Peak() as peak:
        out = worker.train_worker(job, device=device, rank=0, world=1, load=load)
    buf = io.BytesIO()
    torch.save(out.pop("state"), buf)
    return {**out, "state": buf.getvalue(), "peak_rss": peak.rss, "peak_private": peak.private}


def here(job: HeadJob, x: dict, y: dict, *, gpu: bool) -> dict:
    """The same fit and result as `run`, in this process (a local runtime); the peaks are this process's."""
    return fit_head(job, x["train"], y["train"], x["val"], y["val"], gpu=gpu, own_progress=False)


def run(job: HeadJob, x: dict, y: dict, *, gpu: bool, retries: int) -> dict:
    """The task's result: history, best, sweep, device, peak memory, and the kept state as bytes."""
    import ray

    # Top-level refs, so that Ray resolves them in the task: the arrays travel once, through the object store.
    refs = [ray.put(np.ascontiguousarray(a)) for s in ("train", "val") for a in (x[s], y[s])]
    task = ray.remote(fit_head).options(name="ftl-fit-head", num_cpus=1, num_gpus=1 if gpu else 0,
                                        max_retries=retries)
    return ray.get(task.remote(job, *refs, gpu=gpu))


def save(state: bytes, *, storage_path: str, run_name: str, storage_options: dict | None) -> str:
    """The kept head under `storage_path/run_name/` (local or s3://), as Ray Train's checkpoint would be."""
    loc = storage.locate(storage_path, storage_options).join(run_name, "solo")
    loc.fs.makedirs(loc.path, exist_ok=True)
    with loc.fs.open(loc.join(CHECKPOINT).path, "wb") as f:
        f.write(state)
    return loc.uri
