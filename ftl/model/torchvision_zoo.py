"""torchvision's classification zoo as a backbone provider: plain names (`resnet50`, `mobilenet_v2`, `vit_b_16`)."""

from __future__ import annotations

from torch import nn

from ftl.errors import LayerError
from ftl.model.vision import torchvision  # torchvision without torch._dynamo (see vision.py)

PREFIX = ""

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
        raise LayerError(f"unknown backbone {name!r}; valid: {', '.join(names())}, "
                         f"or timm/<name> for timm's models (e.g. timm/vit_small_patch14_dinov2.lvd142m)")


def build(name: str, size: int | None = None) -> nn.Module:
    """The architecture with random weights, in eval mode; any input size works (`size` is for timm's ViTs)."""
    kwargs = {"aux_logits": True, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def tracer_kwargs() -> dict:
    return {}


def head_prefix(model: nn.Module) -> str:
    """Top-level name of the module holding the final Linear (fc, classifier, heads).

    Models whose classifier is a convolution (squeezenet) fall back to the last top-level
    module with parameters.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].split(".")[0]
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())][-1]


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


def sweep_blocks(model: nn.Module) -> list[str]:
    """What a sweep spaces its layers over (unless STAGES picks them by hand): the blocks."""
    return stage_blocks(model)


def adapt(state: dict, model: nn.Module) -> dict:
    """A weights file's state_dict is already in torchvision's layout."""
    return state


def preprocess_defaults(name: str, weights: str | None = None) -> dict:
    """Resize, crop, mean and std that a torchvision weights enum prescribes.

    Without one (weights files, shipped sets), the model's first ImageNet recipe applies:
    the classic resize-256/crop-224 for most models, 342/299 for inception_v3.
    """
    options = torchvision.models.get_model_weights(name)
    chosen = options[weights.split(".")[-1]] if weights else next(iter(options))
    t = chosen.transforms()
    return {"resize": t.resize_size[0], "crop": t.crop_size[0], "mean": tuple(t.mean), "std": tuple(t.std)}


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens in a block's output: torchvision's ViTs have a class token."""
    return 1 if hasattr(model, "class_token") else 0
