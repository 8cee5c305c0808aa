"""LP-FT's first step: the linear probe that fine-tuning starts from, as registered in MLflow.

Kumar et al. (ICLR 2022): fine-tuning from a trained linear head, instead of a random one,
distorts the pretrained features less. The probe is the best linear head on val that `ftl train`
or `ftl sweep` registered for these very features (its image model's version carries the
feature set), or the one `finetune.probe` names; with none, ftl.flows.finetune fits one first. Its
registered image model holds everything fine-tuning needs: the backbone weights that made the
features, the head with its standardisation, the layer and pooling, the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftl import tracking
from ftl.config import Workflow
from ftl.errors import TrainError
from ftl.fitting import evaluate, features
from ftl.io import schema
from ftl.tracking import champion


@dataclass
class Probe:
    model: str  # models:/<name>/<version> of its image model
    meta: dict  # the image model's ftl_model.json: provenance, layer, classes, head config
    backbone_state: dict
    head: object  # ftl.model.heads.Head
    data: features.FeatureData  # its features, for its metrics on the same splits
    sweep_layer: str | None  # the layer a sweep of these features chose, if one did
    why: str = ""  # which probe this is, and why it was chosen (the summary says it)

    @property
    def layer(self) -> str:
        return self.meta["layer"]["name"]

    @property
    def provenance(self) -> schema.Provenance:
        """What made the features the probe was fitted on, as its image model records it."""
        return schema.Provenance.of(self.meta["provenance"])

    def metrics(self) -> dict[str, float]:
        """The probe on train, val and test of its features: what fine-tuning is measured against."""
        out = {}
        for split in features.SPLITS:
            o = evaluate.outcome(self.head, self.data.x[split], self.data.y[split])
            out.update({f"{split}/{k}": v for k, v in evaluate.metrics(o).items()})
        return out


def feature_set(uri: str, storage_options: dict | None) -> str:
    return features.provenance(features.open_table(uri, storage_options)[1]).feature_set


def registered(wf: Workflow, uri: str) -> tuple[str | None, str | None, str]:
    """The probe's model URI, or None; the layer a sweep of these features chose, if one did; why this probe.

    finetune.probe when set; else the champion of the workflow's registered model when it is a linear
    head on these features (whichever command made it); else the best linear head on val registered
    for them.
    """
    found = tracking.find_probes(feature_set(uri, wf.storage.options))
    sweep_layer = next((p["layer"] for p in found if p["stage"] == "sweep"), None)
    if wf.finetune.probe:  # models:/name@champion as the version it is now: the run's key and tags stay true
        pinned = champion.pin(wf.finetune.probe)
        return pinned, sweep_layer, f"started from {pinned}: finetune.probe names it ({wf.finetune.probe})"
    linear = [p for p in found if p["head"] == "linear"]
    name = wf.tracking.registered_model or wf.name
    held = champion.holder(name)
    if held is not None:
        model = f"models:/{name}/{held.version}"
        match = next((p for p in linear if p["model"] == model), None)
        if match is not None:
            return model, sweep_layer, (f"started from the champion {model} (models:/{name}@{champion.ALIAS}, "
                                        f"{match['stage']}, val accuracy {match['val_accuracy']:.4f})")
        unfit = (f"; the champion {model} is not a linear head on these features, so it cannot be the probe"
                 if linear else "")
    else:
        unfit = ""
    if not linear:
        return None, sweep_layer, ""
    best = linear[0]
    return best["model"], sweep_layer, (f"started from {best['model']}, the best linear head on val registered for "
                                        f"these features ({best['stage']}, val accuracy {best['val_accuracy']:.4f})"
                                        f"{unfit or f'; {name} has no champion'}")


def find(wf: Workflow, uri: str, *, fitted: str | None = None) -> Probe:
    """The probe to start from, loaded: its weights, its head, its features and their splits.

    `fitted` is a probe fitted for this run (ftl.flows.finetune fits one when none is registered).
    """
    from safetensors.torch import load_file

    from ftl.model import classifier

    model, sweep_layer, why = registered(wf, uri)
    if fitted is not None and model in (None, fitted):  # found again in the registry, where `ftl train` just put it
        model, why = fitted, f"started from {fitted}, fitted now: no probe of these features was registered"
    if model is None:
        raise TrainError(f"no linear probe is registered for the features at {uri}: run `ftl train` on them "
                         f"first, or name one in finetune.probe")
    with tracking.temp_dir() as tmp:
        folder = tracking.model_folder(model, tmp)
        clf = classifier.ImageClassifier(folder)
        backbone_state = load_file(f"{folder}/backbone.safetensors")
    t = wf.train
    data = features.load(uri, layer=clf.layer, val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=t.seed,
                         storage_options=wf.storage.options)
    if data.provenance.feature_set != clf.meta["provenance"]["feature_set"] or data.classes != clf.classes:
        raise TrainError(f"finetune.probe: {model} was not trained on the features at {data.uri} (other feature set "
                         f"or classes); leave finetune.probe unset to find the probe of these features")
    return Probe(model=model, meta=clf.meta, backbone_state=backbone_state, head=clf.head.cpu().eval(), data=data,
                 sweep_layer=sweep_layer, why=why)
