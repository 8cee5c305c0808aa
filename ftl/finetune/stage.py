"""`ftl finetune`: LP-FT of the chosen blocks on Ray Train → one MLflow run → a new version of the image model.

Steps: the linear probe to start from (ftl.finetune.probes), which blocks train and where the
frozen prefix ends (ftl.finetune.blocks), the images of the probe's splits through Ray Data
(ftl.finetune.data), training on Ray Train (ftl.finetune.loop, ftl.finetune.trainer), then the
run's evaluation (ftl.fitting.register's) and the fine-tuned image model registered under the
workflow's model name, servable unchanged by `ftl predict` and `mlflow.pyfunc.load_model`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ftl import logs, tracking
from ftl.config import Workflow
from ftl.errors import WorkflowError
from ftl.finetune import blocks, cost, data, probes, trainer
from ftl.finetune.job import NetSpec
from ftl.fitting import features, register
from ftl.io import storage
from ftl.tracking import champion

# Settings that change how a run goes, not what it learns: a run resumed with other values is the same run.
RUNTIME_KEYS = {"workers", "use_gpu", "torch_threads", "max_failures", "checkpoints"}


@dataclass(frozen=True)
class FinetuneResult:
    """What `ftl finetune` did: its run, what was tuned, the probe's metrics and the fine-tuned model's."""

    run_id: str
    link: str
    probe: str
    tuned: str  # the kept range of blocks
    candidates: dict[str, float]  # range → best val accuracy (several with blocks: auto)
    rows: dict[str, int]
    metrics: dict[str, float]  # val/ and test/ of the fine-tuned model
    probe_metrics: dict[str, float]  # the same, of the probe, on the same images
    best_epoch: int
    model: str
    checkpoint: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # candidates whose best epoch was 0: the probe's val, not theirs
    selection: dict[str, dict] = field(default_factory=dict)  # range → val SE, paired gain over the probe and its SE

    def summary(self) -> str:
        m, p = self.metrics, self.probe_metrics
        r = self.rows
        lines = [(f"fine-tuned blocks {self.tuned} from probe {self.probe}: rows train {r['train']}, val {r['val']}, "
                  f"test {r['test']}, in {self.seconds:.1f}s (best epoch {self.best_epoch})")]
        if len(self.candidates) > 1:
            lines.append("auto: val accuracy " + "  ".join(
                f"{k} {v:.4f}" + (f" ± {self.selection[k]['val_se']:.4f}" if k in self.selection else "")
                + (" (the probe's: no epoch beat it)" if k in self.unchanged else "")
                for k, v in self.candidates.items()))
        lines += ["val gain over the probe, paired: " + "  ".join(
            f"{k} {r['gain']:+.4f} ± {r['gain_se']:.4f}" for k, r in self.selection.items())] if self.selection else []
        lines += [f"{'':<16}{'probe':>8}{'fine-tuned':>12}"]
        lines += [f"{k:<16}{p[k]:>8.4f}{m[k]:>12.4f}" for k in ("val/accuracy", "test/accuracy", "test/macro_f1",
                                                                  "test/log_loss")]
        lines += [f"image model: {self.model}", f"checkpoint:  {self.checkpoint}",
                  f"MLflow run {self.run_id}: {self.link}"]
        return "\n".join(lines + self.notes)


def check(wf: Workflow) -> None:
    """What the section's types cannot say, before any work: settings that exclude each other, block names."""
    blocks.check_names(wf.finetune.blocks, backbone=wf.extract.backbone)
    if wf.finetune.cache_prefix and wf.finetune.augment:
        raise WorkflowError("finetune.cache_prefix: the frozen prefix's output is reused every epoch, and augmented "
                            "images change every epoch; set finetune.augment: false to cache, or cache_prefix: false")


def run(wf: Workflow, *, fitted_probe: str | None = None) -> FinetuneResult:
    """Fine-tune from the probe of the workflow's features; a finished run is not redone, a killed one resumes.

    `fitted_probe`: the image model of a probe fitted just now for these features, when none was registered.
    """
    from ftl.pipeline.runtime import ensure_ray

    started = time.perf_counter()
    check(wf)
    tracking.setup(wf.tracking, wf.name)
    probe = probes.find(wf, features.uri_of(wf), fitted=fitted_probe)
    backbone = probe.provenance.backbone
    plan = blocks.plan(wf.finetune.blocks, backbone=backbone, layer=probe.layer, kinds=wf.finetune.auto_candidates,
                       sweep_layer=probe.sweep_layer)
    key = finetune_key(wf, probe, plan)
    previous = tracking.find_finetune(key)
    if previous is not None and previous.info.status == "FINISHED":
        return from_run(previous, started)
    ensure_ray()
    return finetune(wf, probe=probe, plan=plan, key=key, resume=previous.info.run_id if previous else None,
                    started=started)


def finetune(wf: Workflow, *, probe: probes.Probe, plan: blocks.Plan, key: str, resume: str | None,
             started: float) -> FinetuneResult:
    """One MLflow run (reopened when resuming): inputs, training, per-epoch metrics beside the probe's, registration."""
    registered = wf.tracking.registered_model or wf.name
    extraction_run = tracking.find_extraction(probe.data.provenance.feature_set, probe.data.uri)
    lineage = register.lineage(probe.data, extraction_run=extraction_run)
    rows = {s: probe.data.rows(s) for s in features.SPLITS}
    tags = {**lineage, "ftl.finetune_key": key, "ftl.probe_model": probe.model, "ftl.model": ""}
    opened = (tracking.resume(wf.tracking, resume) if resume else
              tracking.start(wf.tracking, name=f"finetune-{describe(plan, plan.candidates)}", stage="finetune",
                             tags=tags))
    with opened as run_id:
        if not resume:
            register.log_inputs(wf, data=probe.data, rows=rows, extraction_run=extraction_run)
            tracking.log_params({"probe_model": probe.model, "cut": plan.cut or "input", "candidates":
                                 [blocks.describe(c, plan.order) for c in plan.candidates]})
        tuned, test_rows = train(wf, probe=probe, plan=plan, name=f"{wf.name}-finetune-{key}")
        probe_metrics = probe.metrics()
        log_predictions(tuned, test_rows, classes=probe.data.classes)
        log_history(tuned, probe_metrics=probe_metrics, order=plan.order)
        metrics = register.log_evaluation(torch.nn.Identity(), data=evaluated(tuned, probe, plan))
        tuned_blocks = blocks.describe(tuned.candidates[tuned.chosen]["blocks"], plan.order)
        if tuned.candidates[tuned.chosen]["epoch"] == 0:
            # Epoch 0 is the probe before any step: "fine-tuned", it would be the probe again under a new version,
            # and maybe the champion. The probe stays the model; the run keeps what each candidate reached.
            model, promoted = probe.model, (f"kept the probe {probe.model}: no epoch of fine-tuning beat it on val "
                                            f"loss (best epoch 0), so nothing new was registered")
        elif tuned.kept_probe:  # a gain within val's noise (ftl.finetune.selection): the probe stays the model
            r = tuned.selection[tuned.chosen]
            model, promoted = probe.model, (
                f"kept the probe {probe.model}: no candidate beat it by {wf.finetune.margin_se:g} paired standard "
                f"errors on val (best: {tuned_blocks} {r['gain']:+.4f} ± {r['gain_se']:.4f}), so nothing new was "
                f"registered")
        else:
            model, promoted = register_model(tuned, probe, registered=registered, tags={
                **lineage, "ftl.finetune_run": run_id, "ftl.tuned_blocks": tuned_blocks,
                "ftl.probe_model": probe.model, "ftl.freeze_bn": wf.finetune.freeze_bn,
                "ftl.augment": ",".join(wf.finetune.augment) or "none"})
        tracking.set_tags({"ftl.model": model, "ftl.image_model": model, "ftl.tuned_blocks": tuned_blocks,
                           "ftl.checkpoint": tuned.checkpoint})
    notes = [promoted] + ([f"resumed from its checkpoint at {tuned.resumed_at}"] if tuned.resumed_at else [])
    notes += [probe.why] if probe.why else []
    notes += cost.after(wf.finetune, tuned, plan)
    notes += [f"unreadable images skipped: {tuned.unreadable}"] if tuned.unreadable else []
    return FinetuneResult(
        run_id=run_id, link=tracking.run_link(run_id), probe=probe.model, tuned=tuned_blocks,
        candidates={blocks.describe(c["blocks"], plan.order): c["val_accuracy"] for c in tuned.candidates},
        selection={blocks.describe(c["blocks"], plan.order): r for c, r in zip(tuned.candidates, tuned.selection)},
        unchanged=[blocks.describe(c["blocks"], plan.order) for c in tuned.candidates if c["epoch"] == 0], rows=rows,
        metrics=metrics, probe_metrics=probe_metrics, best_epoch=tuned.candidates[tuned.chosen]["epoch"], model=model,
        checkpoint=tuned.checkpoint, seconds=time.perf_counter() - started, notes=notes)


def describe(plan: blocks.Plan, candidates: list[list[str]]) -> str:
    return "auto" if len(candidates) > 1 else blocks.describe(candidates[0], plan.order)


def train(wf: Workflow, *, probe: probes.Probe, plan: blocks.Plan, name: str) -> tuple[trainer.Tuned, pa.Table]:
    """The probe's rows through Ray Data into the Ray Train workers; checkpoints under finetune.checkpoints."""
    cfg = wf.finetune
    prov, layer = probe.provenance, probe.meta["layer"]
    pre = prov.preprocess
    spec = NetSpec(backbone=prov.backbone, head=probe.meta["head"], cut=plan.cut, node=plan.node,
                   pooling=layer["pooling"], mean=tuple(pre["mean"]), std=tuple(pre["std"]), crop=pre["crop"],
                   freeze_bn=cfg.freeze_bn)
    weights = {"backbone_state": probe.backbone_state, "head_state": probe.head.state_dict()}
    rows = data.split_rows(probe.data.uri, train=wf.train, shuffle_seed=cfg.seed, storage_options=wf.storage.options)
    from ftl.model import imaging

    datasets, column = data.datasets(rows, net=(spec, weights) if cfg.cache_prefix else None,
                                     pre=imaging.Preprocess(pre["resize"], pre["crop"], tuple(pre["mean"]),
                                                            tuple(pre["std"])),
                                     pipeline=wf.extract, storage_options=wf.storage.options)
    checkpoints = cfg.checkpoints or storage.locate(wf.extract.output, wf.storage.options).join("finetune").uri
    for line in cost.before(plan, cfg, images=rows["train"].num_rows):
        logs.say(line)
    tuned = trainer.fit(cfg, spec=spec, weights=weights, plan=plan, datasets=datasets, column=column,
                        classes=probe.data.classes, rows=rows["train"].num_rows, name=name, storage_path=checkpoints,
                        storage_options=wf.storage.options)
    return tuned, rows["test"]


def log_predictions(tuned: trainer.Tuned, rows: pa.Table, *, classes: list[str]) -> None:
    """The kept model's test predictions per image, as evaluation/test_predictions.csv."""
    import pandas as pd

    uris = dict(zip(rows["image_id"].to_pylist(), rows["uri"].to_pylist()))
    proba = torch.softmax(torch.tensor(tuned.test["logits"]), dim=1).numpy()
    names = np.array(classes, dtype=object)
    table = pd.DataFrame({"uri": [uris[i] for i in tuned.test["image_id"]], "label": names[tuned.test["y"]],
                          "predicted": names[proba.argmax(1)], "probability": proba.max(1)})
    tracking.log_text(table.to_csv(index=False), "evaluation/test_predictions.csv")


def log_history(tuned: trainer.Tuned, *, probe_metrics: dict, order: list[str]) -> None:
    """Per-epoch metrics of the kept candidate with the probe's beside them; a child run per candidate of auto."""
    beside = {f"probe_{s}_{k}": probe_metrics[f"{s}/{m}"] for s in ("train", "val")
              for k, m in (("loss", "log_loss"), ("accuracy", "accuracy"))}
    tracking.log_metrics({f"probe/{k}": v for k, v in probe_metrics.items()})

    def rows(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in {**h, **beside}.items() if not (isinstance(v, float) and np.isnan(v))}
                for h in history]

    tracking.log_history_batch(rows(tuned.history))
    tracking.log_metrics({"best_epoch": tuned.candidates[tuned.chosen]["epoch"], "finetune_seconds": tuned.seconds}
                         | selected(tuned, tuned.candidates[tuned.chosen]))
    if len(tuned.candidates) > 1:
        for c in tuned.candidates:
            with tracking.child(name=blocks.describe(c["blocks"], order), stage="candidate"):
                tracking.log_params({"blocks": blocks.describe(c["blocks"], order)})
                tracking.log_history_batch(rows(c["history"]))
                tracking.log_metrics({"val/accuracy": c["val_accuracy"], "val/loss": c["val_loss"],
                                      "best_epoch": c["epoch"]} | selected(tuned, c, test=True)
                                     | ({"seconds": c["seconds"]} if "seconds" in c else {}))


def selected(tuned: trainer.Tuned, c: dict, *, test: bool = False) -> dict:
    """A candidate's paired comparison with the probe on val (and test, for its child run), as metrics.

    The parent run's test/ metrics are the kept model's (the probe's, when it is kept): never a candidate's."""
    if not tuned.selection:
        return {}
    r = tuned.selection[tuned.candidates.index(c)]
    tested = {f"test/{k}": r[f"test_{m}"] for k, m in (("accuracy", "accuracy"), ("gain_over_probe", "gain"),
                                                        ("gain_se", "gain_se")) if test and f"test_{m}" in r}
    return {"val/accuracy_se": r["val_se"], "val/gain_over_probe": r["gain"], "val/gain_se": r["gain_se"],
            "beats_probe": float(r["wins"])} | tested


def evaluated(tuned: trainer.Tuned, probe: probes.Probe, plan: blocks.Plan) -> features.FeatureData:
    """The fine-tuned model's logits as 'features' for ftl.fitting.register's evaluation, through an identity head."""
    kept = blocks.describe(tuned.candidates[tuned.chosen]["blocks"], plan.order)
    split = {"val": tuned.val, "test": tuned.test}
    return features.FeatureData(uri=probe.data.uri, provenance=probe.data.provenance, classes=probe.data.classes,
                                layer=dataclasses.replace(probe.data.layer, name=f"{probe.layer}, fine-tuned {kept}"),
                                x={s: np.array(v["logits"]) for s, v in split.items()},  # writable copies
                                y={s: v["y"].astype(np.int64) for s, v in split.items()},
                                split_source=probe.data.split_source)


def register_model(tuned: trainer.Tuned, probe: probes.Probe, *, registered: str, tags: dict) -> tuple[str, str]:
    """The fine-tuned backbone and head as a new version of the image model (and maybe its champion: the note)."""
    from ftl.model import backbones, classifier, heads

    net = backbones.build(probe.provenance.backbone, probe.provenance.preprocess["crop"])
    net.load_state_dict(tuned.backbone_state)
    head = heads.build(probe.meta["head"], tuned.head_state)
    prov = {**probe.meta["provenance"], "finetuned": {k.removeprefix("ftl."): str(v) for k, v in tags.items()}}
    with tracking.temp_dir() as tmp:
        folder = classifier.save(os.path.join(tmp, "model"), head=head, backbone=net, provenance=prov,
                                 layer=probe.meta["layer"], classes=probe.meta["classes"])
        info = tracking.log_composed(folder, name="image_model", registered=registered, classes=len(probe.data.classes))
    tracking.tag_version(registered, info.registered_model_version, tags)
    score = champion.active_metric("val/accuracy")  # what log_evaluation just logged for the tuned model
    note = champion.promote(registered, info.registered_model_version, val_accuracy=score)
    return f"models:/{registered}/{info.registered_model_version}", note


def finetune_key(wf: Workflow, probe: probes.Probe, plan: blocks.Plan) -> str:
    """Same features, probe, candidates, finetune settings and model name: same run (resumed, or already done)."""
    what = {"features": probe.data.digest, "probe": probe.model, "candidates": plan.candidates,
            "finetune": wf.finetune.model_dump(mode="json", exclude=RUNTIME_KEYS),
            "model": wf.tracking.registered_model or wf.name}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def from_run(run, started: float) -> FinetuneResult:
    """The result of an earlier, finished run with the same key."""
    m, t = run.data.metrics, run.data.tags
    rows = {s: int(run.data.params[f"rows.{s}"]) for s in features.SPLITS}
    return FinetuneResult(
        run_id=run.info.run_id, link=tracking.run_link(run.info.run_id), probe=t["ftl.probe_model"],
        tuned=t["ftl.tuned_blocks"], candidates={}, rows=rows, metrics=m,
        probe_metrics={k.removeprefix("probe/"): v for k, v in m.items() if k.startswith("probe/")},
        best_epoch=int(m["best_epoch"]), model=t["ftl.image_model"], checkpoint=t["ftl.checkpoint"],
        seconds=time.perf_counter() - started,
        notes=["already fine-tuned: the same probe, features and finetune section; nothing to do"])
