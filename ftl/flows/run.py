"""`ftl run`: extract (only what is new), log the extraction, train on what landed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ftl import config, tracking
from ftl.config import Workflow
from ftl.errors import TrackingError
from ftl.extract import stage as extract
from ftl.train import stage as train


@dataclass(frozen=True)
class RunResult:
    extracted: extract.ExtractResult
    extraction_run: str
    trained: train.TrainResult

    def summary(self) -> str:
        return self.trained.summary()


def run(wf: Workflow, *, again: str, tell: Callable[[str], None]) -> RunResult:
    """Both stages; `tell` gets each finished stage's lines as they land, `again` is the command to finish later."""
    extracted = extract.run(wf)
    tell(extracted.summary())
    try:
        extraction_run = tracking.log_extraction(wf.tracking, workflow=wf.name, result=extracted,
                                                 params=config.mask_secrets(wf.model_dump(mode="json")))
        tell(f"MLflow extraction run {extraction_run}: {tracking.run_link(extraction_run)}")
        trained = train.run(wf, extraction_run=extraction_run)
    except Exception as e:
        if not tracking.unreachable(e):
            raise
        # The features are in place and stay: only what needs MLflow is left, and it says how to finish.
        raise TrackingError(f"MLflow at {tracking.uri_of(wf.tracking)} failed after the features landed in "
                            f"{extracted.features_uri}; once it is reachable, run `{again}`: it trains on them "
                            f"and extracts nothing again.\nMLflow said: {str(e).splitlines()[0][:300]}") from e
    return RunResult(extracted=extracted, extraction_run=extraction_run, trained=trained)
