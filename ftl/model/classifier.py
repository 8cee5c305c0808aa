"""The composed image → class model: decode → backbone → layer tap → pooling → standardise → head.

It is saved as a folder (ftl_model.json, backbone.safetensors, head.safetensors) and
served through MLflow's pyfunc `loader_module` protocol: `_load_pyfunc(path)` returns an
object with `predict(DataFrame)`. This module does not import MLflow; tracking.py does.
It ships, with the rest of ftl/model, as the registered model's code: nothing here imports Ray,
pydantic, MLflow or the pipeline's packages (tests/model/test_model_package.py holds it to that).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile

import numpy as np
import pandas as pd
import torch

from ftl.errors import FtlError
from ftl.model import backbones, heads, imaging

META = "ftl_model.json"  # models registered before ftl/model existed (loader ftl.pyfunc) use the same format
MAX_PIXELS = 89_478_485  # PIL's own default: serving never needs to move PIL's process-wide limit
URI_PREFIXES_ENV, MAX_BYTES_ENV = "FTL_MODEL_URI_PREFIXES", "FTL_MODEL_MAX_BYTES"
DEFAULT_MAX_BYTES = 64 * 2**20
# What one predict call may cost, whatever it sends: bytes read or received, and pixels decoded
# (a 16-megapixel PNG can be 40 kB and cost 300 MB and a second to decode).
REQUEST_BYTES_ENV, REQUEST_PIXELS_ENV = "FTL_MODEL_MAX_REQUEST_BYTES", "FTL_MODEL_MAX_REQUEST_PIXELS"
DEFAULT_REQUEST_BYTES, DEFAULT_REQUEST_PIXELS = 256 * 2**20, 256_000_000
# Escapes that a client would decode into `.`, `/` or `\` after the prefix check saw them as text.
ESCAPES = re.compile(r"%(2e|2f|5c)|\\", re.IGNORECASE)
FILES = (META, "backbone.safetensors", "head.safetensors")  # the whole model, in the order its identity hashes


class ModelInputError(FtlError, ValueError):
    """An input the served model refuses: a URI outside the allowed prefixes, or too many bytes."""


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
        self.path = path
        prov, layer = self.meta["provenance"], self.meta["layer"]
        self.classes = list(self.meta["classes"])
        p = prov["preprocess"]
        self.preprocess = imaging.Preprocess(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]))
        model = backbones.build(prov["backbone"], self.preprocess.crop)
        model.load_state_dict(load_file(os.path.join(path, "backbone.safetensors")))
        self.layer = layer["name"]
        self.device = device
        self.tap = backbones.tap(prov["backbone"], model.eval(), [self.layer], pooling=layer["pooling"],
                                 mean=self.preprocess.mean, std=self.preprocess.std,
                                 channels_last=True).to(device).eval()
        self.head = heads.build(self.meta["head"], load_file(os.path.join(path, "head.safetensors"))).to(device).eval()

    @functools.cached_property
    def identity(self) -> str:
        """What this model is, whatever URI named it: a hash of its files (a new version, a new identity)."""
        digest = hashlib.sha256()
        for name in FILES:
            with open(os.path.join(self.path, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def files(self) -> dict[str, bytes]:
        """The model's files, to be sent where this folder is not (another node of the cluster)."""
        out = {}
        for name in FILES:
            with open(os.path.join(self.path, name), "rb") as f:
                out[name] = f.read()
        return out

    @classmethod
    def from_files(cls, files: dict[str, bytes], *, identity: str, device: str = "cpu") -> ImageClassifier:
        """The model rebuilt from `files()`, refused unless its bytes hash to `identity`."""
        digest = hashlib.sha256()
        for name in FILES:
            digest.update(files[name])
        if digest.hexdigest() != identity:
            raise FtlError(f"the model's files arrived with sha256 {digest.hexdigest()[:12]}…, not {identity[:12]}… "
                           f"as loaded; rerun, and if it persists check the object store of the node")
        folder = tempfile.mkdtemp(prefix="ftl-model-")
        try:
            for name, data in files.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            model = cls(folder, device=device)
            model.__dict__["identity"] = identity  # checked above; the folder goes now
            return model
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 → (N, classes) probabilities."""
        with torch.inference_mode():
            feats = self.tap(torch.from_numpy(pixels).to(self.device))[self.layer]
            return torch.softmax(self.head(feats), dim=1).cpu().numpy()

    def decode(self, blobs: list[bytes], budget: Budget | None = None) -> np.ndarray:
        """Pixels of each image; its header's size is taken from `budget` before it is decoded."""
        out = []
        for b in blobs:
            img, header = imaging.open_image(b, max_pixels=MAX_PIXELS)
            if budget is not None:
                budget.take_pixels(header.width * header.height)
            out.append(imaging.decode(img, header=header, pre=self.preprocess))
        return np.stack(out)

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        """A DataFrame with an `image` (bytes) or `uri` column → label, probability, probabilities.

        Rows go through in batches, each read, decoded and classified before the next is read, within
        one request's budget of bytes and pixels.
        """
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" in df.columns and df["image"].notna().all():
            items, fetch = list(df["image"]), bytes
        elif "uri" in df.columns:
            items, fetch = list(df["uri"]), None
        else:
            raise ValueError(f"input needs an 'image' (bytes) or 'uri' column; got columns {list(df.columns)}")
        batch, budget = int((params or {}).get("batch_size", 64)), Budget.from_env()
        parts = []
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            blobs = [budget.take_bytes(bytes(b)) for b in chunk] if fetch else [read(u, budget) for u in chunk]
            parts.append(self.probabilities(self.decode(blobs, budget)))
        proba = np.concatenate(parts) if parts else np.zeros((0, len(self.classes)))
        best = proba.argmax(1) if len(proba) else np.zeros(0, int)
        return pd.DataFrame({
            "label": [self.classes[i] for i in best],
            "probability": proba[np.arange(len(best)), best].astype(np.float64),
            "probabilities": [row.astype(np.float64).tolist() for row in proba],
        })

    def get_raw_model(self) -> ImageClassifier:
        return self


def allowed_prefixes() -> list[str]:
    """Where a served model may read images from, as its operator set it: FTL_MODEL_URI_PREFIXES."""
    return [p.strip() for p in os.environ.get(URI_PREFIXES_ENV, "").split(",") if p.strip()]


def normalised(uri: str) -> str:
    """A URI with `..` and symlinks resolved, so that a prefix check cannot be walked around."""
    if "://" not in uri or uri.startswith("file://"):
        return os.path.realpath(uri.removeprefix("file://"))
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


class Budget:
    """What is left of one request's bytes and pixels."""

    def __init__(self, bytes_left: int, pixels_left: int):
        self.bytes_left, self.pixels_left = bytes_left, pixels_left

    @classmethod
    def from_env(cls) -> Budget:
        return cls(int(os.environ.get(REQUEST_BYTES_ENV, DEFAULT_REQUEST_BYTES)),
                   int(os.environ.get(REQUEST_PIXELS_ENV, DEFAULT_REQUEST_PIXELS)))

    def take_bytes(self, data: bytes) -> bytes:
        self.bytes_left -= len(data)
        if self.bytes_left < 0:
            raise ModelInputError(f"the request's images add up to more than its byte budget ({REQUEST_BYTES_ENV});"
                                  f" send fewer images per request")
        return data

    def take_pixels(self, pixels: int) -> None:
        self.pixels_left -= pixels
        if self.pixels_left < 0:
            raise ModelInputError(f"the request's images add up to more pixels than its budget "
                                  f"({REQUEST_PIXELS_ENV}); send fewer or smaller images per request")


def read(uri: str, budget: Budget | None = None) -> bytes:
    """An image's bytes from a path or fsspec URL under an allowed prefix, at most FTL_MODEL_MAX_BYTES.

    The model reads with the server's own credentials, so a caller names only what the operator
    allowed; raw bytes in the `image` column always work. The URL checked is the URL sent: no
    escapes a client would decode into `.` or `/`, and no redirects followed.
    """
    import fsspec

    if ESCAPES.search(uri):
        raise ModelInputError(f"uri {uri!r} holds an escaped '.', '/' or a backslash; name the image plainly")
    target = normalised(uri)
    allowed = allowed_prefixes()
    if not any(target == (n := normalised(p).rstrip("/")) or target.startswith(n + "/") for p in allowed):
        raise ModelInputError(
            f"uri {uri!r} is not under a prefix this model may read ({URI_PREFIXES_ENV}="
            f"{','.join(allowed) or '<unset>'}); send the image's bytes in the 'image' column, or have the "
            f"operator add its prefix to {URI_PREFIXES_ENV}")
    limit = int(os.environ.get(MAX_BYTES_ENV, DEFAULT_MAX_BYTES))
    web = target.split("://", 1)[0] in ("http", "https")
    with fsspec.open(target, "rb", **({"allow_redirects": False} if web else {})) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelInputError(f"uri {uri!r} holds more than {limit} bytes ({MAX_BYTES_ENV}); not an image to serve")
    return budget.take_bytes(data) if budget is not None else data


def _load_pyfunc(path: str) -> ImageClassifier:
    """MLflow's loader_module entry point."""
    return ImageClassifier(path, device="cuda" if torch.cuda.is_available() else "cpu")
