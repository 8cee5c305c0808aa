"""timm's model zoo as a backbone provider: `timm/<name>[.<tag>]`, e.g. timm/vit_small_patch14_dinov2.lvd142m.

DINOv2, CLIP and SigLIP image towers, ConvNeXt-V2, EVA and EfficientNet-V2 come through one API:
timm builds the architecture, its pretrained config gives each weight's preprocessing, and its
torch.fx settings (the modules and functions timm marks untraceable) let the same graph taps that
serve torchvision's models read any node of a timm model in one forward pass. Blocks are the
children of the module timm's `feature_info` names (a ViT's `blocks.N`, a ConvNeXt's `stages.N`).

timm is imported on first use: a torchvision run, and the registered model of one, never load it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import sys

import torch
from torch import nn

from ftl.errors import LayerError, WeightsError

PREFIX = "timm/"
PRE_LOGITS = "pre_logits"  # the pooled vector that feeds the classifier, whatever node computes it


@functools.cache
def timm():
    return importlib.import_module("timm")


def arch(name: str) -> str:
    return name.removeprefix(PREFIX)


def check_name(name: str) -> None:
    from timm.models import is_model, split_model_name_tag

    base, tag = split_model_name_tag(arch(name))
    if not is_model(base):
        close = difflib.get_close_matches(base, timm().list_models(), n=6, cutoff=0.5)
        raise LayerError(f"unknown timm backbone {arch(name)!r}" + (f"; close: {', '.join(close)}" if close else "")
                         + "; list them with python -c \"import timm; print(timm.list_models('*dino*'))\"")
    try:
        found = config(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        found = None
    if tag and found is None:
        tags = timm().list_models(base, pretrained=True)
        raise LayerError(f"timm backbone {base} has no weights tagged {tag!r}; valid: {', '.join(tags)}")


def config(name: str):
    """timm's pretrained config of the name (its tag's, or the architecture's default tag)."""
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(arch(name))


def build(name: str, size: int | None = None) -> nn.Module:
    """The architecture with random weights, in eval mode; a ViT is built for `size`-pixel inputs.

    A ViT's position embedding has one entry per patch, so the model must be built for the crop
    it will see; weights made for another size are resampled as they load (`adapt`).
    """
    cfg = config(name)
    native = cfg.input_size[-1] if cfg is not None else None
    if size and size != native:
        try:
            return timm().create_model(arch(name), pretrained=False, img_size=size).eval()
        except TypeError:  # CNNs take any size and have no img_size argument
            pass
    return timm().create_model(arch(name), pretrained=False).eval()


def tracer_kwargs() -> dict:
    from timm.models import _features_fx as fx  # public accessors of what timm keeps out of fx tracing

    return {"leaf_modules": list(fx.get_notrace_modules()), "autowrap_functions": list(fx.get_notrace_functions())}


def head_prefix(model: nn.Module) -> str:
    """The classifier's module as the weights' config names it (head, head.fc, classifier)."""
    return model.pretrained_cfg.get("classifier") or "head"


def stage_blocks(model: nn.Module) -> list[str]:
    """The children of the module that holds timm's feature stages: blocks.0 … or stages.0 …"""
    modules = [f["module"] for f in getattr(model, "feature_info", []) if "." in f["module"]]
    if not modules:
        return [f["module"] for f in getattr(model, "feature_info", [])]
    parent = modules[-1].rsplit(".", 1)[0]
    return [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_children()]


def sweep_blocks(model: nn.Module) -> list[str]:
    """What a sweep spaces its layers over: the stages timm reports features at."""
    return [f["module"] for f in getattr(model, "feature_info", [])]


def preprocess_defaults(name: str, weights: str | None = None) -> dict:
    """The weights' own input size, crop fraction, mean and std (timm.data.resolve_data_config)."""
    from timm.data import resolve_data_config

    cfg = config(name)
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    crop = data["input_size"][-1]
    return {"resize": math.floor(crop / data["crop_pct"]), "crop": crop, "mean": tuple(data["mean"]),
            "std": tuple(data["std"])}


def prefix_tokens(model: nn.Module) -> int:
    """Class and register tokens before the patch tokens (DINOv2 with registers has 5; SigLIP none)."""
    return int(getattr(model, "num_prefix_tokens", 0))


def hub_file(name: str) -> tuple[str, str]:
    """The hub weights of the name's tag, downloaded once into the Hugging Face cache: (id, local path)."""
    cfg = config(name)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"timm/{arch(name)} has no hub weights; set extract.weights to a .safetensors or .pth "
                           f"file (path or s3:// URI), or to random")
    from huggingface_hub import hf_hub_download

    repo = cfg.hf_hub_id.split("@")[0]
    errors = []
    for filename in dict.fromkeys([cfg.hf_hub_filename or "model.safetensors", "model.safetensors",
                                   "pytorch_model.bin"]):
        try:
            return f"hf-hub:{repo}/{filename}", hf_hub_download(repo, filename)
        except Exception as e:  # offline, not cached, gated, or no such file: try the next, then say what to do
            errors.append(f"{filename}: {type(e).__name__}")
    raise WeightsError(
        f"could not download the weights of timm/{arch(name)} from the Hugging Face hub ({repo}: "
        f"{'; '.join(errors)}). Offline and not cached? Download model.safetensors where there is a network "
        f"and set extract.weights to its path or s3:// URI")


def adapt(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint in the model's layout: timm's own filter for its family (position embeddings resampled to
    the model's size, original CLIP/DINOv2 key names mapped), or the state as it is."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except Exception as e:  # a file for another architecture: load_file_into names what does not fit
        raise WeightsError(f"weights do not fit {type(model).__name__}: {e}; is the file for this backbone?") from None
