"""Train: features Parquet → head fitted with Ray Train → evaluated → logged and registered in MLflow."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from ftl import tracking
from ftl.config import Workflow
from ftl.fitting import checks, features, register
from ftl.io import storage
from ftl.train import fit, memory


@dataclass(frozen=True)
class TrainResult:
    """What `ftl train` did: its MLflow run, the kept head's metrics, and the registered models."""

    run_id: str
    link: str
    layer: str
    rows: dict[str, int]
    metrics: dict[str, float]
    best: dict
    model: str | None  # models:/name/version of the composed image model
    head_model: str
    checkpoint: str
    seconds: float
    extraction_run: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the splits (checks.check), also the run's ftl.warnings

    def summary(self) -> str:
        m = self.metrics
        lines = [
            (f"trained on layer {self.layer}: rows train {self.rows['train']}, val {self.rows['val']}, "
             f"test {self.rows['test']}, in {self.seconds:.1f}s (best epoch {self.best['epoch']}, "
             f"weight decay {self.best['weight_decay']})"),
            (f"val accuracy {m['val/accuracy']:.4f}   test accuracy {m['test/accuracy']:.4f}   "
             f"test macro-F1 {m['test/macro_f1']:.4f}   test log loss {m['test/log_loss']:.4f}"),
            f"head model:  {self.head_model}",
            f"image model: {self.model or 'not logged'}",
            f"checkpoint:  {self.checkpoint}",
            f"MLflow run {self.run_id}: {self.link}",
        ]
        return "\n".join(lines + self.notes + checks.lines(self.warnings))


def run(wf: Workflow, *, extraction_run: str | None = None) -> TrainResult:
    """Fit, evaluate, log and register one head on the workflow's features."""
    from ftl.pipeline.runtime import ensure_ray

    cfg = wf.train
    started = time.perf_counter()
    data = features.load(features.uri_of(wf), layer=cfg.layer, val_fraction=cfg.val_fraction,
                         test_fraction=cfg.test_fraction, seed=cfg.seed, storage_options=wf.storage.options,
                         version=cfg.features_version)
    warnings = checks.check(data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    tracking.setup(wf.tracking, wf.name)
    registered = wf.tracking.registered_model or wf.name
    key = train_key(wf, data, registered)
    previous = tracking.find_training(key)
    if previous is not None:  # the same head on the same features is already trained and registered
        return from_run(previous, started, warnings=warnings)
    # Only a head still to train needs the backbone, so a rerun neither hashes weights nor loads it.
    # Still before any run starts: weights that do not match the features fail with nothing logged.
    backbone = register.backbone_for(wf, data.provenance)
    extraction_run = extraction_run or tracking.find_extraction(data.provenance.feature_set, data.uri)
    if not in_process(cfg):
        ensure_ray()
    # An L-BFGS split that cannot fit in a worker fails here, before a run is logged.
    streams, _, _ = memory.decide(cfg, rows=data.rows("train"), val_rows=data.rows("val"), dim=data.layer.dim,
                                  classes=len(data.classes))
    if streams:
        ensure_ray()
    return train(wf, data=data, backbone=backbone, registered=registered, key=key, extraction_run=extraction_run,
                 started=started, warnings=warnings)


def train(wf: Workflow, *, data: features.FeatureData, backbone, registered: str, key: str,
          extraction_run: str | None, started: float, warnings: list[str]) -> TrainResult:
    """One MLflow run: the inputs logged, the head fitted, evaluated on val and test, registered."""
    layer, rows = data.layer.name, {s: data.rows(s) for s in features.SPLITS}
    lineage = register.lineage(data, extraction_run=extraction_run)
    with tracking.start(wf.tracking, name=f"train-{wf.train.head}-{layer}", stage="train",
                        tags={**lineage, "ftl.train_key": key, "ftl.model": "", **checks.tag(warnings)}) as run_id:
        register.log_inputs(wf, data=data, rows=rows, extraction_run=extraction_run)
        fitted = fit_head(wf, data=data, run_name=f"{wf.name}-{run_id}")
        metrics = register.log_evaluation(fitted.head, data=data)
        models = register.log_models(fitted.head, backbone=backbone, data=data, registered=registered,
                                     tags={**lineage, "ftl.train_run": run_id})
        tracking.set_tags({"ftl.model": models.image or models.head, "ftl.head_model": models.head,
                           "ftl.image_model": models.image or "", "ftl.checkpoint": fitted.checkpoint})
    streamed = ["train was streamed through Ray Data each epoch: held whole it would not fit in a worker"]
    return TrainResult(run_id=run_id, link=tracking.run_link(run_id), layer=layer, rows=rows, metrics=metrics,
                       best=fitted.best, model=models.image, head_model=models.head, checkpoint=fitted.checkpoint,
                       seconds=time.perf_counter() - started, extraction_run=extraction_run,
                       notes=models.notes + (streamed if fitted.streamed else []), warnings=warnings)


def fit_head(wf: Workflow, *, data: features.FeatureData, run_name: str) -> fit.Fit:
    """The head fitted with Ray Train, checkpointed beside the features; its epochs and sweep logged."""
    cfg = wf.train
    checkpoints = cfg.checkpoints or storage.locate(wf.extract.output, wf.storage.options).join("checkpoints").uri
    fitted = fit.fit(cfg, data.x, data.y, classes=len(data.classes), storage_path=checkpoints, run_name=run_name,
                     storage_options=wf.storage.options)
    tracking.log_history(fitted.history)
    tracking.log_metrics({"train_seconds": fitted.seconds, "best_epoch": fitted.best["epoch"],
                          "best_weight_decay": fitted.best["weight_decay"], "train_streamed": int(fitted.streamed),
                          "worker_peak_rss_mib": fitted.peak_rss / 2**20,
                          "worker_peak_private_mib": fitted.peak_private / 2**20})
    tracking.log_text("\n".join(f"{r}" for r in fitted.sweep) + "\n", "sweep.txt")
    return fitted


def in_process(cfg) -> bool:
    """Whether the head can be fitted in this process with no Ray runtime (ftl.train.solo.here): one worker,
    on this machine; unless the features turn out too large to hold (`memory.decide`), then Ray streams them."""
    from ftl.pipeline import ray_session

    return cfg.workers == 1 and ray_session.this_machine_only()


def train_key(wf: Workflow, data: features.FeatureData, registered: str) -> str:
    """Same features, same train section, same model name: same key, and a rerun does nothing."""
    what = {"features": data.digest, "layer": data.layer.name, "train": wf.train.model_dump(mode="json"),
            "model": registered}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def from_run(run, started: float, *, warnings: list[str]) -> TrainResult:
    """The result of an earlier, identical training run."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    return TrainResult(
        run_id=run.info.run_id, link=tracking.run_link(run.info.run_id), layer=p["layer"],
        rows={s: int(p[f"rows.{s}"]) for s in features.SPLITS}, metrics=m,
        best={"epoch": int(m["best_epoch"]), "weight_decay": m["best_weight_decay"]},
        model=t.get("ftl.image_model") or None, head_model=t["ftl.head_model"], checkpoint=t["ftl.checkpoint"],
        seconds=time.perf_counter() - started, extraction_run=t.get("ftl.extraction_run") or None,
        notes=["already trained: the same features and train section; nothing to do (change train.* to retrain)"],
        warnings=warnings,
    )
