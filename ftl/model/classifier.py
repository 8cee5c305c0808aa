"""The composed image → class model: decode → backbone → layer tap → pooling → standardise → head.

It is saved as a folder (ftl_model.json, backbone.safetensors, head.safetensors) and
served through MLflow's pyfunc `loader_module` protocol: `_load_pyfunc(path)` returns an
object with `predict(DataFrame)`. This module does not import MLflow; tracking.py does.
It ships, with the rest of ftl/model, as the registered model's code: nothing here imports Ray,
pydantic, MLflow or the pipeline's packages (tests/test_model_package.py holds it to that).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch

from ftl.model import backbones, heads, imaging

META = "ftl_model.json"  # models registered before ftl/model existed (loader ftl.pyfunc) use the same format
MAX_PIXELS = 89_478_485  # PIL's own default: serving never needs to move PIL's process-wide limit


def save(path: str, *, head: heads.Head, backbone: torch.nn.Module, provenance: dict, layer: dict,
         classes: list[str]) -> str:
    """Write everything the composed model needs into `path`; backbone weights included, so it runs offline."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, os.path.join(path, "backbone.safetensors"))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(path, "head.safetensors"))
    meta = {"provenance": provenance, "layer": layer, "classes": classes, "head": head.config}
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return path


class ImageClassifier:
    """Images (bytes or URIs) → class names and probabilities."""

    def __init__(self, path: str, *, device: str = "cpu"):
        from safetensors.torch import load_file

        with open(os.path.join(path, META)) as f:
            self.meta = json.load(f)
        prov, layer = self.meta["provenance"], self.meta["layer"]
        self.classes = list(self.meta["classes"])
        p = prov["preprocess"]
        self.preprocess = imaging.Preprocess(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]))
        model = backbones.build(prov["backbone"])
        model.load_state_dict(load_file(os.path.join(path, "backbone.safetensors")))
        self.layer = layer["name"]
        self.device = device
        self.tap = backbones.Tap(model.eval(), [self.layer], pooling=layer["pooling"], mean=self.preprocess.mean,
                                 std=self.preprocess.std, channels_last=True).to(device).eval()
        self.head = heads.build(self.meta["head"], load_file(os.path.join(path, "head.safetensors"))).to(device).eval()

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 → (N, classes) probabilities."""
        with torch.inference_mode():
            feats = self.tap(torch.from_numpy(pixels).to(self.device))[self.layer]
            return torch.softmax(self.head(feats), dim=1).cpu().numpy()

    def decode(self, blobs: list[bytes]) -> np.ndarray:
        return np.stack([imaging.decode_one(b, self.preprocess, max_pixels=MAX_PIXELS)[0] for b in blobs])

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        """A DataFrame with an `image` (bytes) or `uri` column → label, probability, probabilities."""
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" in df.columns and df["image"].notna().all():
            blobs = [bytes(b) for b in df["image"]]
        elif "uri" in df.columns:
            blobs = [read(u) for u in df["uri"]]
        else:
            raise ValueError(f"input needs an 'image' (bytes) or 'uri' column; got columns {list(df.columns)}")
        batch = int((params or {}).get("batch_size", 64))
        proba = np.concatenate([self.probabilities(self.decode(blobs[i : i + batch]))
                                for i in range(0, len(blobs), batch)]) if blobs else np.zeros((0, len(self.classes)))
        best = proba.argmax(1) if len(proba) else np.zeros(0, int)
        return pd.DataFrame({
            "label": [self.classes[i] for i in best],
            "probability": proba[np.arange(len(best)), best].astype(np.float64),
            "probabilities": [row.astype(np.float64).tolist() for row in proba],
        })

    def get_raw_model(self) -> ImageClassifier:
        return self


def read(uri: str) -> bytes:
    """An image's bytes from a path or any fsspec URL (s3:// reads the standard AWS environment)."""
    import fsspec

    with fsspec.open(uri, "rb") as f:
        return f.read()


def _load_pyfunc(path: str) -> ImageClassifier:
    """MLflow's loader_module entry point."""
    return ImageClassifier(path, device="cuda" if torch.cuda.is_available() else "cpu")
