"""Backbones: torchvision classification models by name, their layers and their taps."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from ftl.errors import LayerError
from ftl.model.vision import torchvision  # torchvision without torch._dynamo (see vision.py)

# Not a plain `from torchvision... import`: that would import torchvision before vision.py could.
feature_extraction = importlib.import_module("torchvision.models.feature_extraction")

# The layer that feeds the classifier, where the generic rule (last node outside the
# head module) picks something less useful, e.g. vgg16's 25088-d flatten instead of fc7.
PENULTIMATE = {
    "vgg11": "classifier.4", "vgg13": "classifier.4", "vgg16": "classifier.4", "vgg19": "classifier.4",
    "vgg11_bn": "classifier.4", "vgg13_bn": "classifier.4", "vgg16_bn": "classifier.4",
    "vgg19_bn": "classifier.4", "alexnet": "classifier.5",
    "mobilenet_v3_large": "classifier.1", "mobilenet_v3_small": "classifier.1",
    "convnext_tiny": "classifier.1", "convnext_small": "classifier.1",
    "convnext_base": "classifier.1", "convnext_large": "classifier.1",
}

# Evenly spaced stages, for layer sweeps; the generic rule spaces top-level blocks instead.
STAGES = {
    "mobilenet_v2": ["features.4", "features.7", "features.11", "features.14", "features.18"],
    "resnet18": ["layer1", "layer2", "layer3", "layer4", "flatten"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4", "flatten"],
}


def names() -> list[str]:
    """Every torchvision classification model."""
    return torchvision.models.list_models(module=torchvision.models)


def check_name(name: str) -> None:
    if name not in names():
        raise LayerError(f"unknown backbone {name!r}; valid: {', '.join(names())}")


def build(name: str) -> nn.Module:
    """The architecture with random weights, in eval mode; weights are loaded by `weights.py`."""
    check_name(name)
    kwargs = {"aux_logits": True, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@functools.lru_cache(maxsize=None)
def node_names(name: str) -> tuple[str, ...]:
    """Graph nodes of the eval-mode model (torchvision.models.feature_extraction)."""
    _, nodes = feature_extraction.get_graph_node_names(build(name))
    return tuple(n for n in nodes if n != "x")


@functools.lru_cache(maxsize=None)
def taps(name: str) -> dict[str, str]:
    """Every tap point → the graph node it reads, in graph order.

    Besides each node, a module path such as `layer3` or `features.14` taps the last node
    inside that module, as torchvision's create_feature_extractor does.
    """
    nodes = node_names(name)
    last_of = {}
    for i, node in enumerate(nodes):
        parts = node.split(".")
        for k in range(1, len(parts)):
            last_of[".".join(parts[:k])] = i
    after = {}
    for prefix, i in last_of.items():
        if prefix not in nodes:
            after.setdefault(i, []).append(prefix)
    out = {}
    for i, node in enumerate(nodes):
        out[node] = node
        for prefix in sorted(after.get(i, []), key=len, reverse=True):  # innermost module first
            out[prefix] = node
    return out


def head_prefix(model: nn.Module) -> str:
    """Top-level name of the module holding the final Linear (fc, classifier, heads).

    Models whose classifier is a convolution (squeezenet) fall back to the last top-level
    module with parameters.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].split(".")[0]
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())][-1]


def default_layer(name: str) -> str:
    """The penultimate layer: the features the classifier head reads."""
    if name in PENULTIMATE:
        return PENULTIMATE[name]
    prefix = head_prefix(build(name))
    points = list(taps(name))
    first_head = next(i for i, n in enumerate(points) if n == prefix or n.startswith(prefix + "."))
    return points[first_head - 1]  # what flows into the head


def stage_layers(name: str, count: int = 5) -> list[str]:
    """Evenly spaced layers from early to penultimate, for sweeps."""
    if name in STAGES:
        return STAGES[name]
    blocks = [b for b in stage_blocks(build(name)) if b in taps(name)]
    penultimate = default_layer(name)
    # count - 1 blocks spread from early to the last one, then what the classifier reads.
    picks = [blocks[round(i * (len(blocks) - 1) / max(1, count - 2))] for i in range(count - 1)] if blocks else []
    return list(dict.fromkeys(picks + [penultimate]))


def stage_blocks(model: nn.Module) -> list[str]:
    """The backbone's blocks: children of the shallowest module with three or more container children.

    resnet: layer1..layer4; efficientnet/convnext: features.N; vit: encoder.layers.encoder_layer_N.
    """
    level = [("", model)]
    while level:
        for prefix, module in level:
            containers = [(f"{prefix}{n}", m) for n, m in module.named_children() if any(True for _ in m.children())]
            if len(containers) >= 3:
                return [n for n, _ in containers]
        level = [(f"{p}{n}.", m) for p, mod in level for n, m in mod.named_children() if any(True for _ in m.children())]
    return []


def check_layers(name: str, layers: list[str], *, path: str = "extract.layers") -> list[str]:
    """Layers to tap (the penultimate when none are given); unknown names are an error."""
    check_name(name)
    valid = taps(name)
    for i, layer in enumerate(layers):
        if layer not in valid:
            # Top-level modules first, then the unknown one's siblings (features.0 … features.18
            # for features.99), then other names sharing its prefix.
            top = [v for v in valid if "." not in v]
            near = [v for v in valid if "." in v and v.startswith(layer.rsplit(".", 1)[0] + ".")]
            close = ([v for v in near if v.count(".") == layer.count(".")] or near)[:24]
            raise LayerError(
                f"{path}[{i}]: unknown layer {layer!r} for {name}; valid: {', '.join(top + close)}, "
                f"... ({len(valid)} in all; see: ftl layers {name})"
            )
    if len(set(layers)) != len(layers):
        raise LayerError(f"{path}: lists a layer twice: {layers}")
    return list(layers) or [default_layer(name)]


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """(N, C, H, W) maps and (N, tokens, D) sequences become (N, D) vectors."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:  # transformer tokens: pool over the sequence
        x = x.transpose(1, 2)
    dims = tuple(range(2, x.ndim))
    if how == "avg":
        return x.mean(dims)
    if how == "max":
        return x.amax(dims)
    return torch.cat([x.mean(dims), x.amax(dims)], dim=1)


def pooled_dim(shape: tuple[int, ...], how: str) -> int:
    channels = shape[1] if len(shape) == 4 else shape[-1]
    return channels * 2 if how == "avgmax" and len(shape) > 2 else channels


class Tap(nn.Module):
    """uint8 NHWC images → normalised → ONE forward pass → a pooled (N, D) tensor per layer."""

    def __init__(self, model: nn.Module, layers: list[str], *, pooling: str, mean, std, channels_last: bool):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.layers = list(layers)
        self.pooling = pooling
        self.body = feature_extraction.create_feature_extractor(model.eval(), return_nodes={n: n for n in layers})
        self.body.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # NHWC uint8 permuted is already a channels_last view; keep it only when asked.
        x = images.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format).float()
        x = (x - self.mean) / self.std
        outs = self.body(x)
        return {n: pool(outs[n], self.pooling).float() for n in self.layers}


@functools.lru_cache(maxsize=None)
def layer_shapes(name: str, size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor-valued tap point, from one forward pass on random weights."""
    model = build(name)
    size = size or preprocess_defaults(name)["crop"]
    body = feature_extraction.create_feature_extractor(model, return_nodes=list(node_names(name)))
    with torch.inference_mode():
        outs = body(torch.zeros(2, 3, size, size))
    # A batch of 2 tells activations (leading dim 2) from parameters read inside forward.
    return {
        tap: tuple(outs[node].shape)
        for tap, node in taps(name).items()
        if isinstance(v := outs[node], torch.Tensor) and v.ndim >= 2 and v.shape[0] == 2 and v.is_floating_point()
    }


def layer_dims(name: str, layers: list[str], *, pooling: str, size: int) -> dict[str, int]:
    shapes = layer_shapes(name, size)
    missing = [n for n in layers if n not in shapes]
    if missing:
        raise LayerError(f"layers {missing} of {name} do not output a float tensor; pick another (ftl layers {name})")
    return {n: pooled_dim(shapes[n], pooling) for n in layers}


def tap_points(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """What `ftl layers` lists: every node with a float tensor output, in graph order."""
    return list(layer_shapes(name).items())


def preprocess_defaults(name: str, weights_enum: str | None = None) -> dict:
    """Resize, crop, mean and std that a torchvision weights enum prescribes.

    Without one (weights files, shipped sets), the model's first ImageNet recipe applies:
    the classic resize-256/crop-224 for most models, 342/299 for inception_v3.
    """
    options = torchvision.models.get_model_weights(name)
    chosen = options[weights_enum.split(".")[-1]] if weights_enum else next(iter(options))
    t = chosen.transforms()
    return {"resize": t.resize_size[0], "crop": t.crop_size[0], "mean": tuple(t.mean), "std": tuple(t.std)}
