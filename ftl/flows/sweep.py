"""`ftl sweep`: plan one extraction per swept backbone, extract each (only what is new), then fit and pick heads.

Every backbone's layers and weights are checked before any work, so a bad layer list fails in
a second, not after the first extraction. Each backbone and weights extract into their own
folder under extract.output, tapping all their layers in one forward pass.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from ftl import config, tracking
from ftl.logs import say
from ftl.config import SweepBackbone, Workflow
from ftl.extract import stage as extract
from ftl.io import storage
from ftl.model import backbones
from ftl.train import sweep


@dataclass(frozen=True)
class SweepRun:
    extractions: list[extract.ExtractResult]
    sweep: sweep.SweepResult

    def summary(self) -> str:
        lines = [r.summary().splitlines()[0] + f"  [{r.provenance.backbone} → {r.output}]"
                 for r in self.extractions]
        return "\n".join([*lines, self.sweep.summary()])


def run(wf: Workflow) -> SweepRun:
    """Extract every swept backbone's layers, fit all heads, keep and register the best."""
    started = time.perf_counter()
    subs = plan_extractions(wf)  # before any work: a bad layer list fails here
    params = config.mask_secrets(wf.model_dump(mode="json"))
    extractions, sets = [], []
    for sub in subs:
        result = extract.run(sub)
        extraction_run = tracking.log_extraction(sub.tracking, workflow=wf.name, result=result, params=params)
        extractions.append(result)
        sets.append(sweep.FeatureSet(workflow=sub, uri=result.features_uri, version=result.versions.get("features"),
                                     provenance=result.provenance, extraction_run=extraction_run))
    return SweepRun(extractions=extractions, sweep=sweep.run(wf, sets, started=started))


def output_of(wf: Workflow, entry: SweepBackbone) -> str:
    """Each backbone and weights into its own folder under extract.output."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(entry.weights.rstrip("/")) or entry.weights)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", entry.backbone)  # timm/<name>: one folder, not two
    return storage.locate(wf.extract.output, wf.storage.options).join(f"{name}-{slug}").uri


def plan_extractions(wf: Workflow) -> list[Workflow]:
    """One extraction workflow per swept backbone; layers, weights and dims checked before any work."""
    # Without sweep.backbones, the extract section is the one backbone, with its own layers when it lists any.
    entries = wf.sweep.backbones or [SweepBackbone(backbone=wf.extract.backbone, weights=wf.extract.weights,
                                                   layers=wf.extract.layers)]
    where = "sweep.backbones" if wf.sweep.backbones else "extract"
    subs, seen = [], {}
    for i, entry in enumerate(entries):
        path = f"sweep.backbones[{i}]" if wf.sweep.backbones else "extract"
        backbones.check_name(entry.backbone)
        layers = backbones.check_layers(entry.backbone, entry.layers or backbones.stage_layers(entry.backbone),
                                        path=f"{path}.layers")
        say(f"sweep: {entry.backbone} ({entry.weights}): tapping {', '.join(layers)} "
            + (f"(from {path}.layers)" if entry.layers else
               f"(its evenly spaced stages: {path}.layers lists none)"))
        key = (entry.backbone, entry.weights)
        if key in seen:
            raise config.WorkflowError(f"{path}: {entry.backbone} with weights {entry.weights} is already "
                                       f"{where}[{seen[key]}]; list its layers once, in one entry")
        seen[key] = i
        own = {"pooling": entry.pooling, "preprocess": entry.preprocess}
        ext = wf.extract.model_copy(update={"backbone": entry.backbone, "weights": entry.weights, "layers": layers,
                                            "output": output_of(wf, entry)}
                                    | {k: v for k, v in own.items() if v is not None})
        sub = wf.model_copy(update={"extract": ext})
        extract.model_spec(sub)  # resolves the weights and the dims of every layer, on the driver
        subs.append(sub)
    return subs


