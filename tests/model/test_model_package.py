"""The registered image model: it ships ftl/model alone, pins what that imports, and old models still load."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import ftl.model
from ftl import tracking
from ftl.model import classifier

PIPELINE_ONLY = ("ray", "pydantic", "mlflow", "yaml")
from tests.model.conftest import CLASSES


def run_python(code: str, *args: str, cwd: Path, env: dict | None = None) -> dict:
    """`code` in a fresh interpreter; it prints one JSON object, which comes back."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]  # the child's traceback, not CalledProcessError's
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_model_package_imports_nothing_of_the_pipeline(tmp_path):
    names = [f"ftl.model.{m.name}" for m in pkgutil.iter_modules(ftl.model.__path__)]
    assert {"ftl.model.classifier", "ftl.model.weights", "ftl.model.imaging"} <= set(names)
    got = run_python(
        "import importlib, json, sys\n"
        "for name in sys.argv[1:]: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PIPELINE_ONLY!r} "
        "or m.startswith(('ftl.io', 'ftl.pipeline', 'ftl.config', 'ftl.tracking')))))",
        *names, cwd=tmp_path,
    )
    assert got == []


def imported_distributions(root: str) -> set[str]:
    """The distributions whose modules the Python files under `root` import, ftl and the stdlib aside."""
    modules = set()
    for path in Path(root).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    modules -= {"ftl", *sys.stdlib_module_names}
    return {dist.lower() for m in modules for dist in owners[m]}


def test_pinned_requirements_are_what_the_shipped_code_imports(tmp_path):
    shipped = tracking.model_code(str(tmp_path))
    optional = {p for packages in tracking.BACKBONE_REQUIREMENTS.values() for p in packages}
    assert imported_distributions(shipped) == set(tracking.COMPOSED_REQUIREMENTS) | optional


@pytest.fixture(scope="module")
def expected(model_folder, images) -> pd.DataFrame:
    """What the model says, straight from ftl.model.classifier in this process."""
    out = classifier.ImageClassifier(model_folder).predict(pd.DataFrame({"image": images}))
    assert len(set(out["label"])) > 1, "a head that always says the same could not tell a wrong load apart"
    return out


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got["label"]) == list(want["label"])
    assert np.allclose(np.stack(got["probabilities"]), np.stack(want["probabilities"]), atol=1e-5)


def test_model_saved_with_the_old_loader_module_still_loads(model_folder, images, expected, tmp_path):
    import mlflow.pyfunc

    path = tmp_path / "old-model"
    # As models were logged before ftl/model existed: loader_module ftl.pyfunc, same data folder.
    mlflow.pyfunc.save_model(str(path), loader_module="ftl.pyfunc", data_path=model_folder,
                             pip_requirements=tracking.requirements("torch"))
    assert yaml.safe_load((path / "MLmodel").read_text())["flavors"]["python_function"]["loader_module"] == "ftl.pyfunc"
    assert_same(mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"image": images})), expected)
    assert isinstance(tracking.load_classifier(str(path)), classifier.ImageClassifier)


SERVE = """
import json, sys
import pandas as pd
import mlflow.pyfunc
from PIL import Image

model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"uri": json.loads(sys.argv[2])}))
import ftl
print(json.dumps({
    "label": list(out["label"]), "probabilities": [list(p) for p in out["probabilities"]],
    "ftl": sorted({m: sys.modules[m].__file__ for m in sys.modules if m.split(".")[0] == "ftl"}.items()),
    "ray": sorted(m for m in sys.modules if m.split(".")[0] == "ray"),
    "pil_limit": Image.MAX_IMAGE_PIXELS,
}))
"""


@pytest.fixture
def local_mlflow(tmp_path):
    """An embedded SQLite store in tmp_path; the process's tracking URI comes back afterwards."""
    import mlflow

    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        yield mlflow.create_experiment("model-package", artifact_location=(tmp_path / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(saved)


def test_composed_model_ships_only_the_model_package(model_folder, images, expected, tmp_path, local_mlflow,
                                                     s3_server):
    import boto3
    import mlflow

    with mlflow.start_run(experiment_id=local_mlflow):
        info = tracking.log_composed(model_folder, name="image_model", registered="package-test", classes=len(CLASSES))
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded")))

    model_files = {f"ftl/model/{p.name}" for p in Path(ftl.model.__file__).parent.glob("*.py")}
    shipped = {p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*") if p.is_file()}
    assert shipped == {"ftl/__init__.py", "ftl/errors.py", *model_files}
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "ftl.model.classifier" and flavor["code"] == "code"
    pinned = {line.split("==")[0].lower() for line in (local / "requirements.txt").read_text().split()}
    assert not pinned & {"ray", "pydantic", "pyyaml", "pyarrow", "s3fs"}
    assert pinned - {"mlflow"} == set(tracking.COMPOSED_REQUIREMENTS)

    # Served from a fresh interpreter: the model's own code, images from S3 and from disk.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    uris = []
    for i, blob in enumerate(images):
        if i % 2:
            s3.put_object(Bucket="ftl-test", Key=f"model-package/{i}.img", Body=blob)
            uris.append(f"s3://ftl-test/model-package/{i}.img")
        else:
            (tmp_path / f"{i}.img").write_bytes(blob)
            uris.append(str(tmp_path / f"{i}.img"))
    # The operator allows the two places the images are; nothing else could be read.
    allow = {classifier.URI_PREFIXES_ENV: f"s3://ftl-test/model-package/,{tmp_path}"}
    got = run_python(SERVE, str(local), json.dumps(uris), cwd=tmp_path, env=allow)
    assert_same(pd.DataFrame({"label": got["label"], "probabilities": got["probabilities"]}), expected)
    assert dict(got["ftl"]) and all(f.startswith(str(local / "code" / "ftl")) for f in dict(got["ftl"]).values())
    assert got["ray"] == []
    assert got["pil_limit"] == classifier.MAX_PIXELS  # PIL's default: serving leaves PIL's own guard as it was


def test_served_model_reads_only_allowed_prefixes_and_caps_bytes(model_folder, images, tmp_path, monkeypatch):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    (allowed / "ok.png").write_bytes(images[0])
    (elsewhere / "secret.png").write_bytes(images[1])
    (allowed / "link.png").symlink_to(elsewhere / "secret.png")
    model = classifier.ImageClassifier(model_folder)
    frame = lambda *uris: pd.DataFrame({"uri": [str(u) for u in uris]})  # noqa: E731

    monkeypatch.delenv(classifier.URI_PREFIXES_ENV, raising=False)
    with pytest.raises(classifier.ModelInputError, match="FTL_MODEL_URI_PREFIXES=<unset>"):
        model.predict(frame(allowed / "ok.png"))  # nothing is readable until the operator says where
    monkeypatch.setenv(classifier.URI_PREFIXES_ENV, str(allowed))
    assert len(model.predict(frame(allowed / "ok.png"))) == 1
    for outside in (elsewhere / "secret.png", f"{allowed}/../elsewhere/secret.png", allowed / "link.png",
                    f"{allowed}-sibling/x.png"):
        with pytest.raises(classifier.ModelInputError, match="not under a prefix"):
            model.predict(frame(outside))
    monkeypatch.setenv(classifier.MAX_BYTES_ENV, str(len(images[0]) - 1))
    with pytest.raises(classifier.ModelInputError, match="more than"):
        model.predict(frame(allowed / "ok.png"))
    assert len(model.predict(pd.DataFrame({"image": [images[0]]}))) == 1  # raw bytes always work


def test_a_model_sent_as_bytes_is_the_same_model_or_refused(model_folder, images, expected):
    """What predict's actors get through the object store: the same predictions, or an error on changed bytes."""
    from ftl.errors import FtlError

    model = classifier.ImageClassifier(model_folder)
    files = model.files()
    again = classifier.ImageClassifier.from_files(files, identity=model.identity)
    assert again.identity == model.identity
    assert_same(again.predict(pd.DataFrame({"image": images})), expected)
    damaged = {**files, "head.safetensors": files["head.safetensors"][:-1] + b"\0"}
    with pytest.raises(FtlError, match="sha256"):
        classifier.ImageClassifier.from_files(damaged, identity=model.identity)
