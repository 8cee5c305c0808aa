"""Backbones by name from a small registry of providers, their layers and their taps.

A plain name (`resnet50`) is torchvision's, `timm/<name>` is timm's. Each provider (torchvision_zoo,
timm_zoo) builds its models, names their blocks and sweep stages, says what feeds the classifier,
and gives its weights' preprocessing; everything else here works on the torch.fx graph that
torchvision's feature extraction traces, for either provider alike: tap points are graph nodes,
plus each module path (the last node inside it), plus `pre_logits` for timm models.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType

import torch
from torch import nn

from ftl.errors import LayerError
from ftl.model import timm_zoo, torchvision_zoo

# Not a plain `from torchvision... import`: that would import torchvision before vision.py could.
feature_extraction = importlib.import_module("torchvision.models.feature_extraction")

POOLINGS = ("avg", "max", "avgmax", "cls", "patch_avg", "cls_patch_avg")
TOKEN_POOLINGS = ("cls", "patch_avg", "cls_patch_avg")  # for (N, tokens, D) outputs: ViT blocks


def provider(name: str) -> ModuleType:
    return timm_zoo if name.startswith(timm_zoo.PREFIX) else torchvision_zoo


def provider_of(model: nn.Module) -> ModuleType:
    return timm_zoo if type(model).__module__.startswith("timm.") else torchvision_zoo


def check_name(name: str) -> None:
    provider(name).check_name(name)


def build(name: str, size: int | None = None) -> nn.Module:
    """The architecture with random weights, in eval mode, for `size`-pixel crops; weights are loaded by `weights.py`."""
    check_name(name)
    return provider(name).build(name, size)


def extractor(model: nn.Module, return_nodes) -> nn.Module:
    """torchvision's create_feature_extractor, with the tracing settings of the model's provider."""
    return feature_extraction.create_feature_extractor(model, return_nodes=return_nodes,
                                                       tracer_kwargs=provider_of(model).tracer_kwargs())


@functools.lru_cache(maxsize=None)
def model_of(name: str) -> nn.Module:
    """One built model per name and process, for questions about structure (names, blocks, heads)."""
    return build(name)


@functools.lru_cache(maxsize=None)
def node_names(name: str) -> tuple[str, ...]:
    """Graph nodes of the eval-mode model, its inputs aside."""
    model = model_of(name)
    _, nodes = feature_extraction.get_graph_node_names(model, tracer_kwargs=provider(name).tracer_kwargs())
    inputs = set(inspect.signature(model.forward).parameters)
    return tuple(n for n in nodes if n not in inputs)


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
    if provider(name) is timm_zoo:
        out[timm_zoo.PRE_LOGITS] = out[penultimate(name, out)]
    return out


def head_prefix(model: nn.Module) -> str:
    return provider_of(model).head_prefix(model)


def penultimate(name: str, points: dict[str, str]) -> str:
    """What flows into the head: the last tap point before the classifier's module."""
    prefix = head_prefix(model_of(name))
    listed = list(points)
    first_head = next(i for i, n in enumerate(listed) if n == prefix or n.startswith(prefix + "."))
    return listed[first_head - 1]


def default_layer(name: str) -> str:
    """The penultimate layer: the features the classifier head reads."""
    if provider(name) is timm_zoo:
        return timm_zoo.PRE_LOGITS
    return torchvision_zoo.PENULTIMATE.get(name) or penultimate(name, taps(name))


def stage_blocks(model: nn.Module) -> list[str]:
    """The backbone's blocks, which fine-tuning trains: resnet layer1..4, mobilenet features.N, a ViT's blocks."""
    return provider_of(model).stage_blocks(model)


def blocks_of(name: str) -> list[str]:
    return stage_blocks(model_of(name))


def stage_layers(name: str, count: int = 5) -> list[str]:
    """Evenly spaced layers from early to penultimate, for sweeps."""
    if name in torchvision_zoo.STAGES:
        return torchvision_zoo.STAGES[name]
    blocks = [b for b in provider(name).sweep_blocks(model_of(name)) if b in taps(name)]
    # count - 1 blocks spread from early to the last one, then what the classifier reads.
    picks = [blocks[round(i * (len(blocks) - 1) / max(1, count - 2))] for i in range(count - 1)] if blocks else []
    return list(dict.fromkeys(picks + [default_layer(name)]))


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


def pool(x: torch.Tensor, how: str, *, prefix: int = 0) -> torch.Tensor:
    """(N, C, H, W) maps and (N, tokens, D) sequences become (N, D) vectors.

    For token sequences, `prefix` tokens (class, registers) come before the patch tokens:
    cls is the class token, patch_avg the mean of the patch tokens, cls_patch_avg both side by
    side (DINOv2's linear evaluation); avg and max pool every token.
    """
    if x.ndim == 2:
        return x
    if how in TOKEN_POOLINGS:
        if x.ndim != 3 or (prefix < 1 and how != "patch_avg"):
            raise LayerError(f"pooling {how} needs a token layer with a class token (a ViT block); "
                             f"this layer's output is {tuple(x.shape[1:])}: use avg, max or avgmax")
        if how == "cls":
            return x[:, 0]
        patches = x[:, prefix:].mean(1)
        return patches if how == "patch_avg" else torch.cat([x[:, 0], patches], dim=1)
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
    doubled = how in ("avgmax", "cls_patch_avg")
    return channels * 2 if doubled and len(shape) > 2 else channels


def prefix_tokens(model: nn.Module) -> int:
    return provider_of(model).prefix_tokens(model)


class Tap(nn.Module):
    """uint8 NHWC images → normalised → ONE forward pass → a pooled (N, D) tensor per layer."""

    def __init__(self, model: nn.Module, layers: list[str], *, pooling: str, mean, std, channels_last: bool,
                 nodes: dict[str, str] | None = None):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.layers = list(layers)
        self.pooling = pooling
        self.prefix = prefix_tokens(model)
        # Aliases (timm's pre_logits) read their node; a module path is resolved by the extractor itself.
        nodes = nodes or {}
        self.body = extractor(model.eval(), {nodes.get(n, n): n for n in layers})
        self.body.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # NHWC uint8 permuted is already a channels_last view; keep it only when asked.
        x = images.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format).float()
        x = (x - self.mean) / self.std
        outs = self.body(x)
        return {n: pool(outs[n], self.pooling, prefix=self.prefix).float() for n in self.layers}


def tap(name: str, model: nn.Module, layers: list[str], **kwargs) -> Tap:
    """A Tap on a backbone by name, its aliases resolved."""
    aliases = {timm_zoo.PRE_LOGITS: taps(name)[timm_zoo.PRE_LOGITS]} if provider(name) is timm_zoo else {}
    return Tap(model, layers, nodes=aliases, **kwargs)


@functools.lru_cache(maxsize=None)
def layer_shapes(name: str, size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Output shape of every tensor-valued tap point, from one forward pass on random weights."""
    size = size or preprocess_defaults(name)["crop"]
    model = build(name, size)
    body = extractor(model, list(node_names(name)))
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
    for n in layers:
        pool(torch.zeros(1, *shapes[n][1:]), pooling, prefix=prefix_tokens(model_of(name)))  # a wrong pooling fails here
    return {n: pooled_dim(shapes[n], pooling) for n in layers}


def tap_points(name: str, *, every: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """What `ftl layers` lists: every node with a float tensor output, in graph order, or only the blocks and
    the pre-logits vector (a timm ViT has hundreds of nodes; its blocks are what a probe taps)."""
    shapes = layer_shapes(name)
    if every:
        return list(shapes.items())
    keep = set(blocks_of(name)) | set(stage_layers(name)) | {default_layer(name)}
    return [(n, s) for n, s in shapes.items() if n in keep]


def preprocess_defaults(name: str, weights: str | None = None) -> dict:
    """Resize, crop, mean and std that the weights prescribe."""
    return provider(name).preprocess_defaults(name, weights)
