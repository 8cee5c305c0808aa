"""Sweep's heads: which backbone, and which of its layers, gives the best features for this data?

Given each backbone's extracted layers (ftl.flows.sweep extracts them), fit a head for every
layer × lr × weight decay in one pass over the cached features (`ftl/train/probe.py` says why that and not Ray Tune). The best trial on val
accuracy (ties: lower val log loss) is evaluated on test once, then logged and registered as
`ftl train` does: the head and the composed image → class model. MLflow gets one parent run
and a child run per trial, all children with the same param and metric names.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ftl import config, tracking
from ftl.config import Workflow
from ftl.errors import TrainError
from ftl.fitting import checks, evaluate, features, live, plots, register
from ftl.io.schema import Provenance
from ftl.model import heads
from ftl.train import probe

KEY_METRICS = ("accuracy", "log_loss", "macro_f1", "mean_per_class_accuracy", "top5_accuracy")


@dataclass(frozen=True)
class SweepResult:
    """What `ftl sweep` did: its extractions, every trial, the chosen one and its registered models."""

    run_id: str
    link: str
    trials: list[dict]  # one row per trial, as in trials.csv
    best: dict
    metrics: dict[str, float]  # the chosen head on val and test
    model: str | None
    head_model: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # about the splits (checks.check), also the run's ftl.warnings
    rows: dict[str, int] = field(default_factory=dict)  # train, val and test rows of the chosen feature set

    def summary(self) -> str:
        lines = []
        for (backbone, weights), layers in curve(self.trials).items():
            lines.append(f"val accuracy by layer, {backbone} ({weights}): "
                         + "  ".join(f"{name} {acc:.4f}" for name, acc in layers.items()))
        b, m, r = self.best, self.metrics, self.rows
        if r:  # as `ftl train` says them: what the heads were fitted, chosen and tested on
            lines.append(f"rows train {r['train']}, val {r['val']}, test {r['test']}")
        lines += [
            (f"best of {len(self.trials)} trials: {b['backbone']} ({b['weights']}) layer {b['layer']}, "
             f"lr {b['lr']}, weight decay {b['weight_decay']}: val accuracy {m['val/accuracy']:.4f}, "
             f"test accuracy {m['test/accuracy']:.4f}, test macro-F1 {m['test/macro_f1']:.4f} in {self.seconds:.1f}s"),
            f"head model:  {self.head_model}", f"image model: {self.model or 'not logged'}",
            f"MLflow run {self.run_id}: {self.link}",
        ]
        return "\n".join(lines + self.notes + checks.lines(self.warnings))


def curve(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Best val accuracy per layer (over the grid), per (backbone, weights), in depth order."""
    out: dict = {}
    for t in sorted(rows, key=lambda t: t["layer_index"]):
        layers = out.setdefault((t["backbone"], t["weights"]), {})
        layers[t["layer"]] = max(layers.get(t["layer"], 0.0), t["val/accuracy"])
    return out


def load_layers(sub: Workflow) -> dict[str, features.FeatureData]:
    """Every extracted layer of one backbone, with the same rows in the same order."""
    t = sub.train
    out = {}
    for layer in sub.extract.layers:
        out[layer] = features.load(features.uri_of(sub), layer=layer, val_fraction=t.val_fraction,
                                   test_fraction=t.test_fraction, seed=t.seed, storage_options=sub.storage.options)
    first = next(iter(out.values()))
    for data in out.values():
        if not all(np.array_equal(data.y[s], first.y[s]) for s in features.SPLITS):
            raise TrainError(f"layers at {first.uri} do not read back in the same row order; re-extract them")
    return out


def rank(row: dict) -> tuple[float, float]:
    """The selection rule: val accuracy, then the lower val log loss."""
    return row["val/accuracy"], -row["val/log_loss"]


@dataclass(frozen=True)
class FeatureSet:
    """One backbone's extracted layers, as the sweep fits heads on them."""

    workflow: Workflow  # its own workflow: the extract section names the backbone, weights, layers, output
    uri: str  # the features table
    version: int | None
    provenance: Provenance
    extraction_run: str


def run(wf: Workflow, sets: list[FeatureSet], *, started: float) -> SweepResult:
    """Fit every head on every feature set; keep, evaluate and register the best. One parent MLflow run."""
    params = config.mask_secrets(wf.model_dump(mode="json"))
    tracking.setup(wf.tracking, wf.name)
    with tracking.start(wf.tracking, name="sweep", stage="sweep") as run_id:
        tracking.log_params(params)
        tracking.log_text(config.to_yaml(wf), "workflow.yaml")
        for fs in sets:  # the parent run's lineage: the feature sets it chose among
            prov = fs.provenance
            tracking.log_dataset(fs.uri, name=f"features-{prov.feature_set}", digest=prov.feature_set,
                                 context="training", version=fs.version,
                                 tags={"backbone": prov.backbone, "layers": ",".join(prov.layer_names)})
        rows, chosen, warnings = fit_all(wf, sets)
        with tracking.temp_dir() as tmp:
            tracking.log_file(write_table(rows, os.path.join(tmp, "trials.csv")))
            tracking.log_file(plots.layer_curve_png(curve(rows), os.path.join(tmp, "layer_val_accuracy.png")))
        metrics = register.log_evaluation(chosen.head, data=chosen.data)  # the one and only look at test
        models = register_best(chosen, registered=wf.tracking.registered_model or wf.name, run_id=run_id,
                               trials=len(rows))
    return SweepResult(run_id=run_id, link=tracking.run_link(run_id), trials=rows, best=chosen.row, metrics=metrics,
                       model=models.image, head_model=models.head, seconds=time.perf_counter() - started,
                       notes=models.notes, warnings=warnings,
                       rows={s: chosen.data.rows(s) for s in features.SPLITS})


class Chosen(NamedTuple):
    """The best trial so far: its row, its head, and what registering it needs."""

    row: dict
    head: heads.Head
    data: features.FeatureData
    sub: Workflow
    extraction_run: str


def fit_all(wf: Workflow, sets: list[FeatureSet]) -> tuple[list[dict], Chosen, list[str]]:
    """A row per trial of every backbone, the chosen one marked; the chosen trial; warnings about the splits."""
    rows, chosen, warnings = [], None, {}
    t = wf.train
    with live.training("sweep", remote=False) as shown:  # the heads train here, in the driver
        for k, fs in enumerate(sets):
            sub, extraction_run = fs.workflow, fs.extraction_run
            data = load_layers(sub)
            # Before fitting: every backbone's splits, said once when they agree (the same images: they do).
            found = checks.check(next(iter(data.values())), val_fraction=t.val_fraction, test_fraction=t.test_fraction)
            warnings.update(dict.fromkeys(found))
            tracking.set_tags(checks.tag(list(warnings)))
            on_epoch = reporter(shown.handle, wf, sub, fit=k + 1, fits=len(sets))
            for row, head in sweep_backbone(wf, sub, data, extraction_run, on_epoch=on_epoch):
                rows.append(row)
                if chosen is None or rank(row) > rank(chosen.row):
                    chosen = Chosen(row, head, data[row["layer"]], sub, extraction_run)
    for row in rows:
        row["chosen"] = row is chosen.row
    return rows, chosen, list(warnings)


def reporter(handle, wf: Workflow, sub: Workflow, *, fit: int, fits: int):
    """What the progress line says after each epoch of one backbone's heads."""
    e = sub.extract

    def on_epoch(epoch: int, training: int, best: float) -> None:
        live.tell(handle, epoch=epoch, epochs=wf.sweep.epochs, fit=fit, fits=fits, what="backbone",
                  note=f"{e.backbone} ({e.weights}): {training} heads still training, best val accuracy {best:.4f}")
    return on_epoch


def sweep_backbone(wf: Workflow, sub: Workflow, data: dict[str, features.FeatureData], extraction_run: str, *,
                   on_epoch=None):
    """Fit every layer × grid head of one backbone; log a child run per trial; yield (row, head)."""
    s, t = wf.sweep, wf.train
    first = next(iter(data.values()))
    mlp = s.head == "mlp"
    trials = probe.fit_heads(
        {k: d.x["train"] for k, d in data.items()}, first.y["train"], {k: d.x["val"] for k, d in data.items()},
        first.y["val"], classes=len(first.classes), lrs=s.lr, weight_decays=s.weight_decay,
        hidden=t.hidden if mlp else [], dropout=t.dropout if mlp else 0.0, epochs=s.epochs,
        batch_size=s.batch_size, patience=s.patience, label_smoothing=t.label_smoothing, seed=t.seed,
        on_epoch=on_epoch,
    )
    prov, order = first.provenance, list(data)
    for trial in trials:
        layer = data[trial.layer].layer
        val = evaluate.metrics(evaluate.outcome(trial.head, data[trial.layer].x["val"], first.y["val"]))
        row = {"backbone": prov.backbone, "weights": sub.extract.weights, "layer": trial.layer,
               "layer_index": order.index(trial.layer), "feature_dim": layer.dim, "head": s.head,
               "lr": trial.lr, "weight_decay": trial.weight_decay, "best_epoch": trial.epoch,
               **{f"val/{k}": val[k] for k in KEY_METRICS if k in val}}
        tags = {"ftl.backbone": prov.backbone, "ftl.layer": trial.layer, "ftl.feature_set": prov.feature_set,
                "ftl.extraction_run": extraction_run or ""}
        name = f"{prov.backbone}-{trial.layer}-lr{trial.lr:g}-wd{trial.weight_decay:g}"
        with tracking.child(name=name, stage="trial", tags=tags) as child_id:
            tracking.log_params({k: row[k] for k in ("backbone", "weights", "layer", "layer_index", "feature_dim",
                                                     "head", "lr", "weight_decay")}
                                | {"epochs": s.epochs, "batch_size": s.batch_size, "rows": first.rows("train"),
                                   "feature_set": prov.feature_set})
            tracking.log_history_batch(trial.history)
            tracking.log_metrics({k: v for k, v in row.items() if k.startswith("val/")} | {"best_epoch": trial.epoch})
        row["run_id"] = child_id
        yield row, trial.head


def register_best(chosen: Chosen, *, registered: str, run_id: str, trials: int) -> register.Models:
    """The chosen head and the composed image model, registered as `ftl train` does; best-trial tags on the parent."""
    b, data = chosen.row, chosen.data
    tags = {**register.lineage(data, extraction_run=chosen.extraction_run), "ftl.sweep_run": run_id,
            "ftl.trial_run": b["run_id"]}
    models = register.log_models(chosen.head, backbone=register.backbone_for(chosen.sub, data.provenance), data=data,
                                 registered=registered, tags=tags)
    tracking.log_metrics({"best/val_accuracy": b["val/accuracy"], "trials": trials})
    tracking.set_tags({"ftl.best.backbone": b["backbone"], "ftl.best.weights": b["weights"],
                       "ftl.best.layer": b["layer"], "ftl.best.lr": b["lr"], "ftl.best.weight_decay": b["weight_decay"],
                       "ftl.best.trial_run": b["run_id"], "ftl.best.val_accuracy": b["val/accuracy"],
                       "ftl.head_model": models.head, "ftl.image_model": models.image or ""})
    return models


def write_table(rows: list[dict], path: str) -> str:
    import pandas as pd

    table = pd.DataFrame(rows).sort_values(["backbone", "weights", "layer_index", "lr", "weight_decay"])
    table.to_csv(path, index=False)
    return path
