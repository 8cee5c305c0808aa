"""Fitting a head: in one Ray task when one worker holds it (ftl.train.solo; in this process on a local
runtime), else TorchTrainer workers reading their shards through Ray Data.

Each worker holds its shard in memory when it fits (features are small next to images), so
an epoch costs a pass over a tensor, not a pass through the Ray Data pipeline. When it does
not fit (`memory.decide`), AdamW streams the shard through Ray Data in batches every epoch, and
L-BFGS, which is full-batch, stops before starting and says so. Val is given whole to every
worker, so all of them take the same early-stopping decision.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from ftl import logs
from ftl.config import TrainConfig
from ftl.errors import TrainError
from ftl.fitting import core, live
from ftl.fitting.workers import all_reduce, ingest_options, run_config, torch_config, use_gpu
from ftl.model import heads
from ftl.pipeline import ray_session
from ftl.train import memory, shards, solo
from ftl.train.job import HeadJob
from ftl.train.worker import LBFGS_ITERS, train_worker

MAX_FAILURES = 2  # worker-group restarts before a fit fails (see the FailureConfig below)


@dataclass
class Fit:
    head: heads.Head
    history: list[dict]
    best: dict  # metrics of the kept epoch, with its weight decay
    sweep: list[dict]
    checkpoint: str
    workers: int
    device: str
    seconds: float
    streamed: bool = False  # train read through Ray Data every epoch instead of held
    peak_rss: int = 0  # bytes: the largest peak resident memory of any worker, mapped object store pages included
    peak_private: int = 0  # bytes: the largest peak of any worker's private memory (what `estimate` predicts)
    estimate: int = 0  # bytes per worker that memory.need predicted


def train_loop(config: dict) -> dict:
    """Runs on every Ray Train worker; rank 0 returns the history and every worker's peak memory."""
    import ray.train
    import ray.train.torch

    logs.own_progress()
    device = ray.train.torch.get_device()
    rank, world = ray.train.get_context().get_world_rank(), ray_world()
    with memory.Peak() as peak:
        out = train_worker(config["job"], device=device, rank=rank, world=world,
                           load=lambda split, rows: shards.shard_tensors(split, device, rows=rows))
    # Ray Train keeps the head as the run's checkpoint: rank 0 writes it, every worker reports.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(out.pop("state"), os.path.join(tmp, "head.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(out["best"], checkpoint=checkpoint)
    out.pop("state", None)
    # The largest peak of any worker; the private one is what memory.need estimates.
    peaks = all_reduce(torch.tensor([peak.rss, peak.private], device=device), "max").tolist()
    return {**out, "peak_rss": peaks[0], "peak_private": peaks[1]}


def ray_world() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def fit(cfg: TrainConfig, x: dict, y: dict, *, classes: int, storage_path: str, run_name: str,
        storage_options: dict | None = None, stream: bool | None = None, lbfgs_iters: int = LBFGS_ITERS,
        worker_group: bool = False, task: bool = False, **lbfgs) -> Fit:
    """Fit one head (or a weight-decay sweep): in one Ray task when one worker holds it, else with TorchTrainer.

    For benchmarks: `stream=True` streams train even when it would fit held (else the memory a
    worker may use decides); `lbfgs_iters` sets L-BFGS iterations per epoch; `worker_group=True` fits on a
    worker group even when one task would do, `task=True` in a Ray task even on this machine alone;
    `lbfgs_path` and `lbfgs_tolerance` as in HeadJob.
    """
    started = time.perf_counter()
    hidden = cfg.hidden if cfg.head == "mlp" else []
    rows = {s: len(y[s]) for s in ("train", "val")}
    dim = x["train"].shape[1]
    # Before anything is copied: an L-BFGS split that cannot fit stops here, with the numbers.
    auto, need, _ = memory.decide(cfg, rows=rows["train"], val_rows=rows["val"], dim=dim, classes=classes)
    stream = auto or bool(stream) and cfg.optimizer == "adamw"  # forcing can only add streaming, never overfill
    torch.manual_seed(cfg.seed)  # the initial head, shared by every worker and sweep value
    mean, std = core.standardisation(x["train"])
    head_config = {"dim": dim, "classes": classes, "hidden": hidden, "dropout": cfg.dropout if hidden else 0.0}
    initial = heads.Head(dim, classes, hidden=hidden, mean=mean, std=std).state_dict()
    weights = heads.class_weights(y["train"], classes, cfg.class_weights)
    gpu = use_gpu(cfg.use_gpu)
    solo_fit = not (stream or worker_group) and cfg.workers == 1  # one worker holds it: no group (train.solo)
    here = solo_fit and not task and ray_session.this_machine_only()
    shown = live.training("train", remote=not here)  # epochs as they end, from rank 0 (ftl.fitting.live)
    job = HeadJob(train=cfg, head=head_config, initial=initial,
                  class_weights=None if weights is None else weights.tolist(), stream=stream, rows=rows,
                  lbfgs_iters=lbfgs_iters, progress=shown.handle, **lbfgs)
    try:
        with shown:
            if solo_fit:
                out = solo.here(job, x, y, gpu=gpu) if here else solo.run(job, x, y, gpu=gpu, retries=MAX_FAILURES)
                blob = out.pop("state")
                checkpoint = solo.save(blob, storage_path=storage_path, run_name=run_name,
                                       storage_options=storage_options)
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            else:
                out, checkpoint, state = group(job, x, y, gpu=gpu, storage_path=storage_path, run_name=run_name,
                                               storage_options=storage_options)
    except Exception as e:  # Ray's error wraps the worker's traceback, which it has already logged
        raise TrainError(f"fitting the head failed after {MAX_FAILURES} restarts of its workers: "
                         f"{str(e).splitlines()[0][:300]}\nThe features are unchanged: rerun the same command "
                         f"to fit again.") from e
    head = heads.build(head_config, state).eval()
    return Fit(head=head, history=out["history"], best=out["best"], sweep=out["sweep"], checkpoint=checkpoint,
               workers=cfg.workers, device=out["device"], seconds=time.perf_counter() - started, streamed=stream,
               peak_rss=out["peak_rss"], peak_private=out["peak_private"],
               estimate=need.streamed if stream else need.held)


def group(job: HeadJob, x: dict, y: dict, *, gpu: bool, storage_path: str, run_name: str,
          storage_options: dict | None) -> tuple[dict, str, dict]:
    """The fit on a TorchTrainer worker group reading its shards through Ray Data; the head from its checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = job.train
    # A head fits in seconds and, seeded, comes out the same: a restarted worker group fits it
    # again from the start. Only the kept head is checkpointed, at the end.
    loc, run = run_config(name=run_name, storage_path=storage_path, storage_options=storage_options,
                          max_failures=MAX_FAILURES)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job},
        torch_config=torch_config(gpu), scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=gpu),
        run_config=run,
        datasets={"train": shards.to_dataset(x["train"], y["train"], blocks=max(2, cfg.workers * 2),
                                      seed=cfg.seed if job.stream else None),
                  "val": shards.to_dataset(x["val"], y["val"], blocks=1)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "head.pt"), map_location="cpu", weights_only=True)
    return result.return_value, loc.to_uri(result.checkpoint.path), state
