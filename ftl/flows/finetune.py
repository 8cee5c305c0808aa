"""`ftl finetune`: LP-FT's two steps, the linear probe first (found in MLflow, or fitted now), then fine-tuning."""

from __future__ import annotations

from ftl import tracking
from ftl.config import Workflow
from ftl.errors import TrainError
from ftl.finetune import probes
from ftl.finetune import stage as finetune
from ftl.fitting import features
from ftl.train import stage as train


def run(wf: Workflow) -> finetune.FinetuneResult:
    """Fine-tune from the registered probe of the workflow's features; with none, `ftl train` fits one first."""
    finetune.check(wf)  # before a probe is fitted for nothing
    tracking.setup(wf.tracking, wf.name)
    model, _, _ = probes.registered(wf, features.uri_of(wf))
    if model is not None:
        return finetune.run(wf)
    fitted = train.run(wf.model_copy(update={"train": wf.train.model_copy(update={"head": "linear"})}))
    if fitted.model is None:
        raise TrainError("fine-tuning needs the probe's image model, and features from random-init weights have "
                         "none; extract with pretrained weights")
    return finetune.run(wf, fitted_probe=fitted.model)
