"""Models: the head and the composed image model logged, registered, tagged and loaded again."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

import numpy as np

from ftl.errors import TrackingError

# The code the composed model carries: the Ray-free model package and the one module it needs besides.
SHIPPED_CODE = ("__init__.py", "errors.py", "model")
# What that code imports (tests/model/test_model_package.py checks the two against each other).
COMPOSED_REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy", "pandas", "safetensors", "fsspec")
# And what it imports only for some backbones, by the backbone name's prefix.
BACKBONE_REQUIREMENTS = {"timm/": ("timm", "huggingface_hub")}


def composed_requirements(backbone: str) -> tuple[str, ...]:
    """What the composed model of `backbone` needs: a timm backbone's model also pins timm."""
    extra = [p for prefix, packages in BACKBONE_REQUIREMENTS.items() if backbone.startswith(prefix) for p in packages]
    return (*COMPOSED_REQUIREMENTS, *extra)


def requirements(*packages: str) -> list[str]:
    """Pinned pip requirements of what we know the model imports; MLflow's guessing costs seconds."""
    return [f"{p}=={importlib.metadata.version(p)}" for p in packages]


@contextlib.contextmanager
def registering():
    """MLflow prints "Successfully registered model" and "Created version" lines, which ftl's summary says
    already: they show only with --verbose. Failures still raise."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    from ftl import logs

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = logs.verbose()
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


def log_head(head, example: np.ndarray, *, name: str, registered: str | None):
    """The head (probabilities out) as pt2: a torch.export graph, loadable without ftl's code."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = head(torch.from_numpy(example)).numpy()
    with registering():
        return mlflow.pytorch.log_model(
            head, name=name, signature=infer_signature(example, out), input_example=example,
            serialization_format="pt2", pip_requirements=requirements("torch"), registered_model_name=registered,
        )


def log_composed(folder: str, *, name: str, registered: str, classes: int):
    """The image → class pyfunc, carrying ftl's model package and the backbone weights."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "uri", required=False)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability"),
                        ColSpec(Array("double"), "probabilities")]),
    )
    import json

    with open(os.path.join(folder, "ftl_model.json")) as f:
        backbone = json.load(f)["provenance"]["backbone"]
    with tempfile.TemporaryDirectory(prefix="ftl-code-") as tmp, registering():
        return mlflow.pyfunc.log_model(
            input_example=example_input(),
            name=name, loader_module="ftl.model.classifier", data_path=folder, code_paths=[model_code(tmp)],
            signature=signature, pip_requirements=requirements(*composed_requirements(backbone)),
            registered_model_name=registered,
        )


def example_input():
    """One small grey PNG as the model takes it: the model's page shows it, and MLflow checks that the
    logged model answers it before registering."""
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def model_code(parent: str) -> str:
    """A copy of SHIPPED_CODE as `parent`/ftl, so that it keeps the import name `ftl`; returns that folder."""
    import shutil

    import ftl

    source = os.path.dirname(ftl.__file__)

    def skip(folder: str, names: list[str]) -> list[str]:
        top = os.path.samefile(folder, source)
        return [n for n in names if n == "__pycache__" or (top and n not in SHIPPED_CODE)]

    return shutil.copytree(source, os.path.join(parent, "ftl"), ignore=skip)


def tag_version(name: str, version: str, tags: dict) -> None:
    """Tags on a registered model version: what it was built from."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def load_classifier(model_uri: str, *, tracking_uri: str | None = None):
    """The composed model's ImageClassifier, from models:/name/version, runs:/ or a path."""
    import mlflow.pyfunc

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(model_uri).get_raw_model()
    except Exception as e:
        raise TrackingError(f"cannot load model {model_uri} from {mlflow.get_tracking_uri()}: {e}") from e


def model_folder(model_uri: str, dst: str) -> str:
    """The files of a composed image model (ftl_model.json, weights), downloaded under `dst`."""
    import mlflow.artifacts

    try:
        root = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    except Exception as e:
        raise TrackingError(f"cannot download model {model_uri} from {mlflow.get_tracking_uri()}: {e}") from e
    found = sorted(Path(root).rglob("ftl_model.json"))
    if not found:
        raise TrackingError(f"{model_uri} is not an ftl image model (no ftl_model.json); give one that ftl registered")
    return str(found[0].parent)
