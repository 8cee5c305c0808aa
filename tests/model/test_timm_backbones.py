"""timm backbones through the provider contract: layers with dims, one-pass taps, token pooling, weights files,
and the registered image model served from a venv that has timm but not ftl."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ftl.cli import main
from ftl.errors import LayerError, WeightsError
from ftl.model import backbones, classifier, heads, weights
from tests.model.conftest import CLASSES

# name → (crop the test runs at, pre_logits dim, block count): small crops keep random ViTs fast on a CPU.
REPRESENTATIVE = {
    "timm/vit_small_patch14_dinov2.lvd142m": (56, 384, 12),
    "timm/vit_base_patch16_clip_224.openai": (32, 768, 12),
    "timm/convnextv2_atto.fcmae_ft_in1k": (64, 320, 4),
    "timm/efficientnetv2_rw_t.ra2_in1k": (64, 1024, 6),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Each model's random weights, as a user's .safetensors file: made at the model's own input size."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("timm-weights")
    out = {}
    for i, name in enumerate(REPRESENTATIVE):
        torch.manual_seed(100 + i)
        model = backbones.build(name)  # native size: a ViT file then needs its position embedding resampled
        path = folder / f"{name.split('/')[1]}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", list(REPRESENTATIVE))
def test_contract_from_a_safetensors_file(name, saved):
    crop, dim, count = REPRESENTATIVE[name]
    listed = dict(backbones.tap_points(name, every=False))
    blocks = backbones.blocks_of(name)
    assert len(blocks) == count and set(blocks) <= set(listed)
    assert backbones.default_layer(name) == "pre_logits" and listed["pre_logits"] == (2, dim)
    sweep = backbones.stage_layers(name)
    assert sweep[-1] == "pre_logits" and len(sweep) >= 3 and all(s in backbones.taps(name) for s in sweep)

    ref = weights.resolve(name, saved[name])
    assert ref.kind == "file" and len(ref.sha256) == 64
    model = weights.load(name, ref, size=crop)
    from safetensors.torch import load_file

    stored = load_file(saved[name])
    for key, value in model.state_dict().items():  # every tensor is the file's, a resampled position embedding aside
        if value.shape == stored[key].shape:
            assert torch.equal(value, stored[key]), key
    layers = [blocks[len(blocks) // 2], blocks[-1], "pre_logits"]
    dims = backbones.layer_dims(name, layers, pooling="avg", size=crop)
    assert dims["pre_logits"] == dim
    tap = backbones.tap(name, model, layers, pooling="avg", mean=(0.5,) * 3, std=(0.25,) * 3, channels_last=True)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # a leaf of the traced graph
    calls = []
    stem.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        out = tap(torch.randint(0, 256, (3, crop, crop, 3), dtype=torch.uint8))
    assert len(calls) == 1  # three layers, one forward pass
    for layer in layers:
        assert out[layer].shape == (3, dims[layer]) and torch.isfinite(out[layer]).all()


def test_token_pooling_matches_timms_own_intermediates(saved):
    name = "timm/vit_small_patch14_dinov2.lvd142m"
    crop = REPRESENTATIVE[name][0]
    model = weights.load(name, weights.resolve(name, saved[name]), size=crop)
    images = torch.randint(0, 256, (2, crop, crop, 3), dtype=torch.uint8)
    got = {}
    for pooling in ("cls", "patch_avg", "cls_patch_avg"):
        assert backbones.layer_dims(name, ["blocks.5"], pooling=pooling, size=crop)["blocks.5"] == (
            768 if pooling == "cls_patch_avg" else 384)
        tap = backbones.tap(name, model, ["blocks.5"], pooling=pooling, mean=(0.5,) * 3, std=(0.25,) * 3,
                            channels_last=False)
        with torch.inference_mode():
            got[pooling] = tap(images)["blocks.5"]
    # timm's forward_intermediates on the same normalised input: patch tokens and the class token of block 5.
    x = (images.permute(0, 3, 1, 2).float() - 0.5 * 255) / (0.25 * 255)
    with torch.inference_mode():
        [(patches, prefix)] = model.forward_intermediates(x, indices=[5], output_fmt="NLC", norm=False,
                                                          return_prefix_tokens=True, intermediates_only=True)
    torch.testing.assert_close(got["cls"], prefix[:, 0])
    torch.testing.assert_close(got["patch_avg"], patches.mean(1))
    torch.testing.assert_close(got["cls_patch_avg"], torch.cat([prefix[:, 0], patches.mean(1)], 1))
    with pytest.raises(LayerError, match="token layer"):  # a CNN's maps have no class token
        backbones.layer_dims("timm/convnextv2_atto.fcmae_ft_in1k", ["stages.2"], pooling="cls", size=64)


def test_names_and_weights_errors_say_what_to_do(tmp_path, capsys):
    with pytest.raises(LayerError, match="close: vit_small_patch14_dinov2"):
        backbones.check_name("timm/vit_small_patch14_dinov")
    with pytest.raises(LayerError, match="no weights tagged 'nope'"):
        backbones.check_name("timm/vit_small_patch14_dinov2.nope")
    with pytest.raises(WeightsError, match="takes DEFAULT"):
        weights.resolve("timm/convnextv2_atto.fcmae_ft_in1k", "IMAGENET1K_V1")
    wrong = tmp_path / "resnet.safetensors"
    from safetensors.torch import save_file

    save_file(backbones.build("resnet18").state_dict(), str(wrong))
    with pytest.raises(WeightsError, match="does not fit|do not fit"):
        weights.load("timm/convnextv2_atto.fcmae_ft_in1k", weights.resolve("timm/convnextv2_atto.fcmae_ft_in1k",
                                                                            str(wrong)), size=64)
    assert main(["layers", "timm/convnextv2_atto.fcmae_ft_in1k"]) == 0
    out = capsys.readouterr().out
    assert "stages.3" in out and "pre_logits" in out and "(default: penultimate)" in out and "--all" in out


def test_offline_hub_weights_name_the_file_fix(monkeypatch, tmp_path):
    """No network and nothing cached: the error says to use a file (the hub is unreachable from here by design)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="set extract.weights to its path or s3:// URI"):
        weights.resolve("timm/convnextv2_atto.fcmae_ft_in1k", "DEFAULT")


SERVE = """
import json, sys
try:
    import ftl  # noqa: F401
    had_ftl = True
except ImportError:
    had_ftl = False
import pandas as pd, mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"uri": json.loads(sys.argv[2])}))
print(json.dumps({"had_ftl": had_ftl, "label": list(out["label"]),
                  "probabilities": [list(p) for p in out["probabilities"]],
                  "ftl": sorted(m.__file__ for k, m in sys.modules.items() if k.split(".")[0] == "ftl")}))
"""


def bare_venv(where: Path) -> Path:
    """A new venv that sees this environment's packages (torch, timm, MLflow) but not the ftl installed in it:
    a .pth line adds site-packages to the path without running the .pth files there (ftl's editable install)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_registered_timm_model_serves_from_a_venv_without_ftl(saved, images, tmp_path):
    import mlflow

    from ftl import tracking

    name = "timm/vit_small_patch14_dinov2.lvd142m"
    crop = REPRESENTATIVE[name][0]
    ref = weights.resolve(name, saved[name])
    backbone = weights.load(name, ref, size=crop)
    torch.manual_seed(0)
    head = heads.Head(768, len(CLASSES), mean=np.zeros(768, np.float32), std=np.full(768, 0.5, np.float32))
    prov = {"backbone": name, "weights": ref.to_dict(),
            "preprocess": {"resize": 64, "crop": crop, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    folder = classifier.save(str(tmp_path / "model"), head=head, backbone=backbone, provenance=prov,
                             layer={"name": "blocks.11", "pooling": "cls_patch_avg"}, classes=CLASSES)
    want = classifier.ImageClassifier(folder).predict(pd.DataFrame({"image": images}))
    assert len(set(want["label"])) > 1 or np.ptp(np.stack(want["probabilities"])) > 0

    saved_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("timm-package", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = tracking.log_composed(folder, name="image_model", registered="timm-test", classes=len(CLASSES))
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded")))
    finally:
        mlflow.set_tracking_uri(saved_uri)
    pinned = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    import timm

    assert pinned["timm"] == timm.__version__ and "huggingface_hub" in pinned

    for i, blob in enumerate(images):
        (tmp_path / f"{i}.img").write_bytes(blob)
    uris = [str(tmp_path / f"{i}.img") for i in range(len(images))]
    python = bare_venv(tmp_path / "venv")
    done = subprocess.run([str(python), "-c", SERVE, str(local), json.dumps(uris)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                       classifier.URI_PREFIXES_ENV: str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["had_ftl"] is False  # the venv has no ftl of its own: the model's code is what ran
    assert got["ftl"] and all(f.startswith(str(local / "code")) for f in got["ftl"])
    assert got["label"] == list(want["label"])
    np.testing.assert_allclose(np.stack(got["probabilities"]), np.stack(want["probabilities"]), atol=1e-5)
