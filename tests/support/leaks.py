"""Where a secret could land after a run, searched byte for byte: files, objects, MLflow, a Ray job's record."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import s3fs


def in_files(root: str | Path, secret: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Files under `root` whose bytes hold `secret` (paths containing any of `skip` are not read)."""
    needle, hits = secret.encode(), []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if any(s in path for s in skip) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        hits.append(path)
            except OSError:
                pass
    return hits


def in_objects(prefix: str, secret: str) -> list[str]:
    """Objects under an s3:// prefix whose bytes hold `secret`: parts (rows and metadata), _ftl.json,
    the lease, checkpoints, staged leftovers."""
    fs = s3fs.S3FileSystem()
    return [k for k in fs.find(prefix.removeprefix("s3://")) if secret.encode() in fs.cat_file(k)]


def in_mlflow(tracking_uri: str, secret: str) -> list[str]:
    """Every run's params, tags and artifacts, and every registered model version, holding `secret`."""
    import mlflow
    from mlflow import MlflowClient

    client, hits = MlflowClient(tracking_uri, registry_uri=tracking_uri), []
    experiments = client.search_experiments()
    for exp in experiments:
        if secret in repr(exp):
            hits.append(f"experiment {exp.name}")
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            for what, values in (("param", run.data.params), ("tag", run.data.tags)):
                hits += [f"run {run.info.run_id} {what} {k}" for k, v in values.items() if secret in f"{k}={v}"]
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=tmp, tracking_uri=tracking_uri)
                hits += [f"run {run.info.run_id} artifact {os.path.relpath(p, tmp)}" for p in in_files(tmp, secret)]
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            if secret in repr(version):
                hits.append(f"model version {model.name}/{version.version}")
    return hits
