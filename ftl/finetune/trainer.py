"""The driver's side of fine-tuning on Ray Train: the worker group, its checkpoints, and what comes back.

A run is named after what it trains (ftl.finetune.stage's key), so the rerun of a killed run
finds its checkpoints under the same name and Ray Train restores from the latest; worker
failures inside one run are retried from it too (finetune.max_failures).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ftl.config import FinetuneConfig
from ftl.errors import TrainError
from ftl.finetune import loop, resume
from ftl.finetune.blocks import Plan
from ftl.finetune.job import FinetuneJob, NetSpec
from ftl.fitting import live
from ftl.fitting.workers import ingest_options, run_config, torch_config, use_gpu


@dataclass
class Tuned:
    """The kept model's weights, its per-candidate histories, and its logits on val and test."""

    backbone_state: dict
    head_state: dict
    candidates: list[dict]  # blocks, kept epoch, val loss and accuracy, history
    chosen: int
    val: dict  # logits, y
    test: dict  # logits, y, image_id
    device: str
    resumed_at: str | None
    unreadable: int
    checkpoint: str
    seconds: float
    kept_probe: bool = False  # no candidate beat the probe by finetune.margin_se (ftl.finetune.selection)
    selection: list[dict] = field(default_factory=list)  # per candidate: val accuracy, SE, paired gain
    skipped: list[int] = field(default_factory=list)  # candidates finetune.budget_minutes left out (plan's indices)

    @property
    def history(self) -> list[dict]:
        return self.candidates[self.chosen]["history"]


def states(p: dict, prefix: str) -> dict:
    """One module's part of the kept state (Chunked → Finetuned → backbone or head)."""
    return {k.removeprefix(prefix): v for k, v in p.items() if k.startswith(prefix)}


def fit(cfg: FinetuneConfig, *, spec: NetSpec, weights: dict, plan: Plan, datasets: dict, column: str,
        classes: list[str], rows: int, name: str, storage_path: str, storage_options: dict | None) -> Tuned:
    """Train every candidate of `plan` on a TorchTrainer worker group; resumes a run of the same name."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    gpu = use_gpu(cfg.use_gpu)
    loc, run = run_config(name=name, storage_path=storage_path, storage_options=storage_options,
                          max_failures=cfg.max_failures)
    # The weights travel once through the object store, not inside every worker's pickled config.
    shown = live.training("finetune")  # epochs as they end, from rank 0 (ftl.fitting.live)
    job = FinetuneJob(finetune=cfg, spec=spec, states=ray.put(weights), candidates=plan.candidates, order=plan.order,
                      column=column, classes=classes, rows=rows, progress=shown.handle)
    ingest = ray.train.DataConfig(datasets_to_split=["train"],
                                  execution_options=ingest_options(preserve_order=True))
    trainer = TorchTrainer(loop.train_loop, train_loop_config={"job": job}, run_config=run, datasets=datasets,
                           torch_config=torch_config(gpu), dataset_config=ingest,
                           scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=gpu))
    try:
        with shown:
            result = trainer.fit()
    except Exception as e:  # Ray Train's own error wraps the worker's traceback, which it has logged
        raise TrainError(f"fine-tuning failed: {e}\nIts checkpoints are under {loc.join(name).uri}: rerun the same "
                         f"command to resume from the last one.") from e
    out = result.return_value
    with result.checkpoint.as_directory() as d:
        kept = resume.kept(d)
    return Tuned(backbone_state=states(kept, "net.backbone."), head_state=states(kept, "net.head."),
                 candidates=out["candidates"], chosen=out["chosen"], val=out["val"], test=out["test"],
                 device=out["device"], resumed_at=out["resumed_at"], unreadable=out["unreadable"],
                 checkpoint=loc.to_uri(result.checkpoint.path), seconds=time.perf_counter() - started,
                 kept_probe=out["kept_probe"], selection=out["selection"], skipped=out.get("skipped", []))
