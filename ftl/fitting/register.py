"""What `ftl train`, `ftl sweep` and `ftl finetune` log: their inputs, the kept model's evaluation, its lineage.

They all start by logging the same inputs (the resolved workflow, what identifies the features)
and end the same way: the kept head is evaluated on val and test once, then logged and
registered twice (the head alone, and composed with the backbone that made its features as an
image → class model), each version tagged with where it came from, the pair given the alias
`champion` when it earns it (ftl.tracking.champion).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ftl import config, tracking
from ftl.config import Workflow
from ftl.errors import TrainError, WeightsError
from ftl.fitting import evaluate, plots
from ftl.fitting.features import FeatureData
from ftl.io.schema import Provenance
from ftl.model import weights
from ftl.tracking import champion


@dataclass(frozen=True)
class Models:
    """The registered versions of one kept head."""

    head: str  # models:/name-head/version
    image: str | None  # models:/name/version of the composed image model; None when it cannot be rebuilt
    notes: list[str] = field(default_factory=list)


def backbone_for(wf: Workflow, prov: Provenance):
    """The backbone with the very weights that made the features (sha256 checked), or None for random ones."""
    w = prov.weights
    if w.kind == "random":
        return None
    for candidate in dict.fromkeys([wf.extract.weights, w.id.split(".")[-1]]):
        try:
            ref = weights.resolve(prov.backbone, candidate, storage_options=wf.storage.options)
        except WeightsError:
            continue
        if ref.sha256 == w.sha256:
            return weights.load(prov.backbone, ref, storage_options=wf.storage.options, size=prov.preprocess["crop"])
    raise TrainError(
        f"the features were made with weights {w.id} (sha256 {w.sha256[:12]}…), which neither "
        f"extract.weights={wf.extract.weights!r} nor {w.id!r} resolves to; set extract.weights to that file"
    )


def lineage(data: FeatureData, *, extraction_run: str | None) -> dict[str, str]:
    """Tags that tie a run or a model version to the features it was trained on."""
    prov = data.provenance
    return {"ftl.backbone": prov.backbone, "ftl.layer": data.layer.name, "ftl.feature_set": prov.feature_set,
            "ftl.weights_sha256": prov.weights.sha256 or "", "ftl.extraction_run": extraction_run or ""}


def log_evaluation(head, *, data: FeatureData) -> dict[str, float]:
    """Metrics on val and test; per split the report, the per-class table, the confusion cells and pictures."""
    out = {}
    for split in ("val", "test"):
        o = evaluate.outcome(head, data.x[split], data.y[split])
        out.update({f"{split}/{k}": v for k, v in evaluate.metrics(o).items()})
        log_split(o, data=data, split=split)
    tracking.log_metrics(out)
    return out


def log_split(o: evaluate.Outcome, *, data: FeatureData, split: str) -> None:
    """One split's artifacts under evaluation/: sized by rows and a bounded number of classes, never by classes²."""
    names, title = data.classes, f"{split}: {data.layer.name}"
    table = f"evaluation/{split}_per_class.csv"
    tracking.log_text(evaluate.report(o, names, full_table=table), f"evaluation/{split}_report.txt")
    tracking.log_text(evaluate.per_class_table(o, names).to_csv(index=False), table)
    tracking.log_text(evaluate.confusion_table(o, names).to_csv(index=False), f"evaluation/{split}_confusion.csv")
    with tracking.temp_dir() as tmp:
        for draw, name in ((plots.confusion_png, "confusion"), (plots.confused_pairs_png, "confused_pairs"),
                           (plots.per_class_png, "per_class_accuracy")):
            png = draw(o, names, os.path.join(tmp, f"{split}_{name}.png"), title=title)
            if png:
                tracking.log_file(png, "evaluation")


def log_models(head, *, backbone, data: FeatureData, registered: str, tags: dict) -> Models:
    """The composed image model (pyfunc), then the head (pt2), both registered and tagged.

    The image model goes first: if MLflow fails between the two, what is left is an image model that
    serves on its own, never a head whose image model is missing.
    """
    from ftl.model import classifier, heads

    image_model, notes = None, []
    if backbone is None:
        notes = ["image model not logged: the features come from random-init weights, which cannot be rebuilt"]
    else:
        with tracking.temp_dir() as tmp:
            folder = classifier.save(os.path.join(tmp, "model"), head=head, backbone=backbone,
                                     provenance=data.provenance.to_dict(), layer=asdict(data.layer),
                                     classes=data.classes)
            info = tracking.log_composed(folder, name="image_model", registered=registered, classes=len(data.classes))
        tracking.tag_version(registered, info.registered_model_version, tags)
        image_model = f"models:/{registered}/{info.registered_model_version}"
    head_info = tracking.log_head(heads.Probabilities(head).eval(), data.x["train"][:4], name="head",
                                  registered=f"{registered}-head")
    tracking.tag_version(f"{registered}-head", head_info.registered_model_version, tags)
    head_version = (f"{registered}-head", head_info.registered_model_version)
    score = champion.active_metric("val/accuracy")  # what log_evaluation logged for this head
    if image_model:  # one pair: the head's alias follows its image model's
        notes.append(champion.promote(registered, info.registered_model_version, val_accuracy=score,
                                      follower=head_version))
    else:
        notes.append(champion.promote(*head_version, val_accuracy=score))
    return Models(head=f"models:/{registered}-head/{head_info.registered_model_version}", image=image_model,
                  notes=notes)


def log_inputs(wf: Workflow, *, data: FeatureData, rows: dict[str, int], extraction_run: str | None) -> None:
    """The resolved workflow, what identifies the features, the class names, and the features as a dataset."""
    prov, layer = data.provenance, data.layer
    tracking.log_params({
        **config.mask_secrets(wf.model_dump(mode="json")),
        "backbone": prov.backbone, "weights_sha256": prov.weights.sha256, "layer": layer.name,
        "feature_dim": layer.dim, "features_uri": data.uri, "classes": len(data.classes),
        "rows": rows, "split_source": data.split_source, "extraction_run": extraction_run or "none",
        "features_version": data.version,
    })
    tracking.log_text(config.to_yaml(wf), "workflow.yaml")
    tracking.log_text("\n".join(data.classes) + "\n", "classes.txt")
    tracking.log_dataset(data.uri, name=f"features-{prov.feature_set}", digest=data.digest, context="training",
                         tags={"layer": layer.name, "rows": sum(rows.values()), "version": data.version},
                         version=data.version)
