"""Backbone contract: every supported model lists its layers, taps them, and returns the dims it reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftl.cli import main
from ftl.model import backbones

SUPPORTED = ["resnet18", "resnet50", "vgg16", "inception_v3", "mobilenet_v2", "mobilenet_v3_large",
             "efficientnet_b0", "convnext_tiny", "vit_b_16"]


@pytest.mark.parametrize("name", SUPPORTED)
def test_contract(name):
    torch.manual_seed(0)
    points = dict(backbones.tap_points(name))
    default = backbones.default_layer(name)
    assert default in points
    middle = list(points)[len(points) // 2]
    layers = [middle, default]
    size = backbones.preprocess_defaults(name)["crop"] if name.startswith("vit") else 96 if name == "inception_v3" else 64
    for pooling in ("avg", "avgmax"):
        dims = backbones.layer_dims(name, layers, pooling=pooling, size=size)
        tap = backbones.Tap(backbones.build(name), layers, pooling=pooling, mean=(0.5,) * 3, std=(0.25,) * 3,
                            channels_last=True)
        images = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
        with torch.inference_mode():
            out = tap(images)
        for layer in layers:
            assert out[layer].shape == (2, dims[layer]), (name, layer, pooling)
            assert torch.isfinite(out[layer]).all()


@pytest.mark.parametrize("name,expected", [("resnet50", ("flatten", 2048)), ("mobilenet_v2", ("flatten", 1280)),
                                           ("vgg16", ("classifier.4", 4096)), ("vit_b_16", ("getitem_5", 768)),
                                           ("convnext_tiny", ("classifier.1", 768))])
def test_default_layer_is_penultimate(name, expected):
    layer = backbones.default_layer(name)
    assert (layer, backbones.layer_dims(name, [layer], pooling="avg", size=224)[layer]) == expected


def test_pooling_variants():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    assert torch.equal(backbones.pool(x, "avg"), x.mean((2, 3)))
    assert torch.equal(backbones.pool(x, "max"), x.amax((2, 3)))
    assert backbones.pool(x, "avgmax").shape == (1, 4)
    tokens = torch.randn(2, 5, 7)  # (N, tokens, D) from a transformer
    np.testing.assert_allclose(backbones.pool(tokens, "avg"), tokens.mean(1), rtol=1e-6)


def test_unknown_layer_lists_valid_names():
    with pytest.raises(backbones.LayerError) as e:
        backbones.check_layers("resnet50", ["layer1", "layer9"])
    msg = str(e.value)
    assert "extract.layers[1]" in msg and "'layer9'" in msg and "layer4" in msg and "ftl layers resnet50" in msg


def test_unknown_backbone_lists_choices():
    with pytest.raises(backbones.LayerError, match="valid: .*resnet50"):
        backbones.check_layers("resnet5000", [])


def test_layers_command(capsys):
    assert main(["layers", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "(256, 14, 14)" in out
    line = next(l for l in out.splitlines() if l.startswith("flatten "))
    assert "512" in line and "default" in line
