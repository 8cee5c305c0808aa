"""Train: features Parquet → head fitted with Ray Train → evaluated → logged and registered in MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from ftl import config, tracking
from ftl.config import Workflow
from ftl.errors import TrainError
from ftl.io import storage
from ftl.model import weights
from ftl.train import evaluate, features, fit


@dataclass
class TrainResult:
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

    def summary(self) -> str:
        m = self.metrics
        lines = [
            f"trained on layer {self.layer}: rows train {self.rows['train']}, val {self.rows['val']}, "
            f"test {self.rows['test']}, in {self.seconds:.1f}s (best epoch {self.best['epoch']}, "
            f"weight decay {self.best['weight_decay']})",
            f"val accuracy {m['val/accuracy']:.4f}   test accuracy {m['test/accuracy']:.4f}   "
            f"test macro-F1 {m['test/macro_f1']:.4f}   test log loss {m['test/log_loss']:.4f}",
            f"head model:  {self.head_model}",
            f"image model: {self.model or 'not logged'}",
            f"checkpoint:  {self.checkpoint}",
            f"MLflow run {self.run_id}: {self.link}",
        ]
        return "\n".join(lines + self.notes)


def features_uri(wf: Workflow) -> str:
    return wf.train.features or storage.locate(wf.extract.output, wf.storage.options).join("features").uri


def backbone_for(wf: Workflow, prov: dict):
    """The backbone with the very weights that made the features (sha256 checked), or None for random ones."""
    w = prov["weights"]
    if w["kind"] == "random":
        return None
    for candidate in dict.fromkeys([wf.extract.weights, w["id"].split(".")[-1]]):
        try:
            ref = weights.resolve(prov["backbone"], candidate, storage_options=wf.storage.options)
        except weights.WeightsError:
            continue
        if ref.sha256 == w["sha256"]:
            return weights.load(prov["backbone"], ref, storage_options=wf.storage.options)
    raise TrainError(
        f"the features were made with weights {w['id']} (sha256 {w['sha256'][:12]}…), which neither "
        f"extract.weights={wf.extract.weights!r} nor {w['id']!r} resolves to; set extract.weights to that file"
    )


def run(wf: Workflow, *, extraction_run: str | None = None) -> TrainResult:
    """Fit, evaluate, log and register one head on the workflow's features."""
    from ftl.pipeline.runtime import ensure_ray

    cfg = wf.train
    started = time.perf_counter()
    data = features.load(features_uri(wf), layer=cfg.layer, val_fraction=cfg.val_fraction,
                         test_fraction=cfg.test_fraction, seed=cfg.seed, storage_options=wf.storage.options)
    prov, layer = data.provenance, data.layer
    backbone = backbone_for(wf, prov)
    tracking.setup(wf.tracking, wf.name)
    extraction_run = extraction_run or tracking.find_extraction(prov["feature_set"], data.uri)
    registered = wf.tracking.registered_model or wf.name
    rows = {s: data.rows(s) for s in features.SPLITS}
    key = train_key(wf, data, registered)
    previous = tracking.find_training(key)
    if previous is not None:  # the same head on the same features is already trained and registered
        return from_run(previous, started)
    lineage = {"ftl.backbone": prov["backbone"], "ftl.layer": layer["name"], "ftl.feature_set": prov["feature_set"],
               "ftl.weights_sha256": prov["weights"]["sha256"], "ftl.extraction_run": extraction_run or ""}
    run_tags = {**lineage, "ftl.train_key": key, "ftl.model": ""}
    ensure_ray()
    with tracking.start(wf.tracking, name=f"train-{cfg.head}-{layer['name']}", stage="train", tags=run_tags) as run_id:
        tracking.log_params({
            **config.mask_secrets(wf.model_dump(mode="json")),
            "backbone": prov["backbone"], "weights_sha256": prov["weights"]["sha256"], "layer": layer["name"],
            "feature_dim": layer["dim"], "features_uri": data.uri, "classes": len(data.classes),
            "rows": rows, "split_source": data.split_source, "extraction_run": extraction_run or "none",
        })
        tracking.log_text(config.to_yaml(wf), "workflow.yaml")
        tracking.log_text("\n".join(data.classes) + "\n", "classes.txt")
        tracking.log_dataset(data.uri, name=f"features-{prov['feature_set']}", digest=data.digest, context="training",
                             tags={"layer": layer["name"], "rows": sum(rows.values())})
        checkpoints = cfg.checkpoints or storage.locate(wf.extract.output, wf.storage.options).join("checkpoints").uri
        fitted = fit.fit(cfg, data.x, data.y, classes=len(data.classes), storage_path=checkpoints,
                         run_name=f"{wf.name}-{run_id}", storage_options=wf.storage.options)
        tracking.log_history(fitted.history)
        tracking.log_metrics({"train_seconds": fitted.seconds, "best_epoch": fitted.best["epoch"],
                              "best_weight_decay": fitted.best["weight_decay"]})
        tracking.log_text("\n".join(f"{r}" for r in fitted.sweep) + "\n", "sweep.txt")
        metrics = log_evaluation(fitted.head, data)
        result = TrainResult(run_id=run_id, link="", layer=layer["name"], rows=rows, metrics=metrics, best=fitted.best,
                             model=None, head_model="", checkpoint=fitted.checkpoint, seconds=0.0,
                             extraction_run=extraction_run)
        log_models(result, fitted.head, backbone, data, registered=registered, tags={**lineage, "ftl.train_run": run_id})
        tracking.set_tags({"ftl.model": result.model or result.head_model, "ftl.head_model": result.head_model,
                           "ftl.image_model": result.model or "", "ftl.checkpoint": result.checkpoint})
    result.seconds = time.perf_counter() - started
    result.link = tracking.run_link(run_id)
    return result


def train_key(wf: Workflow, data: features.FeatureData, registered: str) -> str:
    """Same features, same train section, same model name: same key, and a rerun does nothing."""
    what = {"features": data.digest, "layer": data.layer["name"], "train": wf.train.model_dump(mode="json"),
            "model": registered}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def from_run(run, started: float) -> TrainResult:
    """The result of an earlier, identical training run."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    return TrainResult(
        run_id=run.info.run_id, link=tracking.run_link(run.info.run_id), layer=p["layer"],
        rows={s: int(p[f"rows.{s}"]) for s in features.SPLITS}, metrics=m,
        best={"epoch": int(m["best_epoch"]), "weight_decay": m["best_weight_decay"]},
        model=t.get("ftl.image_model") or None, head_model=t["ftl.head_model"], checkpoint=t["ftl.checkpoint"],
        seconds=time.perf_counter() - started, extraction_run=t.get("ftl.extraction_run") or None,
        notes=["already trained: the same features and train section; nothing to do (change train.* to retrain)"],
    )


def log_evaluation(head, data: features.FeatureData) -> dict[str, float]:
    """Metrics on val and test; the confusion matrix and per-class report of each as artifacts."""
    out = {}
    with tracking.temp_dir() as tmp:
        for split in ("val", "test"):
            proba = evaluate.predict_proba(head, data.x[split])
            out.update({f"{split}/{k}": v for k, v in evaluate.metrics(proba, data.y[split]).items()})
            tracking.log_text(evaluate.report(proba, data.y[split], data.classes), f"evaluation/{split}_report.txt")
            png = evaluate.confusion_png(proba, data.y[split], data.classes, os.path.join(tmp, f"{split}_confusion.png"),
                                         title=f"{split}: {data.layer['name']}")
            tracking.log_file(png, "evaluation")
    tracking.log_metrics(out)
    return out


def log_models(result: TrainResult, head, backbone, data: features.FeatureData, *, registered: str,
               tags: dict) -> None:
    """The head (pt2) and the composed image model (pyfunc), both registered and tagged."""
    from ftl.model import classifier, heads

    head_info = tracking.log_head(heads.Probabilities(head).eval(), data.x["train"][:4], name="head",
                                  registered=f"{registered}-head")
    tracking.tag_version(f"{registered}-head", head_info.registered_model_version, tags)
    result.head_model = f"models:/{registered}-head/{head_info.registered_model_version}"
    if backbone is None:
        result.notes.append("image model not logged: the features come from random-init weights, which "
                            "cannot be rebuilt")
        return
    with tracking.temp_dir() as tmp:
        folder = classifier.save(os.path.join(tmp, "model"), head=head, backbone=backbone, provenance=data.provenance,
                             layer=data.layer, classes=data.classes)
        info = tracking.log_composed(folder, name="image_model", registered=registered, classes=len(data.classes))
    tracking.tag_version(registered, info.registered_model_version, tags)
    result.model = f"models:/{registered}/{info.registered_model_version}"
