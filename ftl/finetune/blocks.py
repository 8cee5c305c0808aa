"""Which blocks of the backbone train: a range, a list, the default, or `auto`'s candidates; the cut; lr groups.

Blocks are `backbones.stage_blocks` (mobilenet_v2: features.0 … features.18; resnet: layer1 …
layer4; vit: encoder.layers.encoder_layer_N). Only blocks that feed the probe's layer can
change its features, so only they may train. Stages (`backbones.stage_layers`) group blocks:
the default trains the last stage that feeds the layer, or, after a sweep chose an earlier
layer than the head reads, the blocks after that one (what the frozen features did not carry).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ftl.errors import WorkflowError
from ftl.fitting import core
from ftl.model import backbones


@dataclass(frozen=True)
class Plan:
    """The candidates to train (one unless auto), and where the frozen prefix ends: the input of the first block."""

    candidates: list[list[str]]
    cut: str | None  # graph node whose output the suffix starts from; None: the image itself
    node: str  # graph node of the probe's layer
    order: list[str]  # the blocks that feed the layer, in depth order


def first_node(nodes: tuple[str, ...], block: str) -> int:
    return next(i for i, n in enumerate(nodes) if n == block or n.startswith(block + "."))


def feeding(backbone: str, layer: str) -> list[str]:
    """The blocks whose output reaches `layer`, in depth order."""
    nodes = backbones.node_names(backbone)
    at = nodes.index(backbones.taps(backbone)[layer])
    return [b for b in backbones.blocks_of(backbone) if first_node(nodes, b) <= at]


def stages(backbone: str, blocks: list[str]) -> list[list[str]]:
    """`blocks` grouped by the backbone's stage boundaries (ftl.model.backbones.stage_layers)."""
    nodes, taps = backbones.node_names(backbone), backbones.taps(backbone)
    bounds = sorted(nodes.index(taps[s]) for s in backbones.stage_layers(backbone) if s in taps)
    groups: dict[int, list[str]] = {}
    for b in blocks:
        start = first_node(nodes, b)
        groups.setdefault(sum(1 for x in bounds if x < start), []).append(b)
    return list(groups.values())


def check_names(spec: str | list[str] | None, *, backbone: str) -> None:
    """Every block `spec` names is one of the backbone's; checked before any work."""
    every = backbones.blocks_of(backbone)
    names = [] if spec in (None, "auto") else spec if isinstance(spec, list) else spec.split(":")
    for i, name in enumerate(names):
        if name and name not in every:
            at = f"finetune.blocks[{i}]" if isinstance(spec, list) else "finetune.blocks"
            raise WorkflowError(f"{at}: unknown block {name!r} for {backbone}; valid: {', '.join(every)}")


def parse(spec: str | list[str], *, backbone: str, valid: list[str], layer: str) -> list[str]:
    """A range ('a:b', 'a:', ':b', 'a', both ends included) or a list → blocks in depth order, each checked."""
    check_names(spec, backbone=backbone)
    for name in spec if isinstance(spec, list) else spec.split(":"):
        if name and name not in valid:
            raise WorkflowError(f"finetune.blocks: {name} comes after {layer}, the layer the head reads, so training "
                                f"it would change nothing; valid: {', '.join(valid)}")
    if isinstance(spec, list):
        return sorted(dict.fromkeys(spec), key=valid.index)
    start, _, end = spec.partition(":")
    lo = valid.index(start) if start else 0
    hi = valid.index(end) if end else (len(valid) - 1 if ":" in spec else lo)
    if hi < lo:
        raise WorkflowError(f"finetune.blocks: {spec!r} is empty: {end} comes before {start}")
    return valid[lo : hi + 1]


# The whole backbone trains with layer-wise lr decay unless finetune.layer_decay says otherwise: without it,
# the first blocks (generic edges and textures) would move as fast as the top one. BEiT and MAE use 0.65-0.75.
WHOLE_BACKBONE_LAYER_DECAY = 0.75


def layer_decay(cfg, trained: list[str], order: list[str]) -> float | None:
    """finetune.layer_decay, else WHOLE_BACKBONE_LAYER_DECAY for a candidate that trains every block."""
    if cfg.layer_decay is not None:
        return cfg.layer_decay
    return WHOLE_BACKBONE_LAYER_DECAY if list(trained) == list(order) else None


def candidates(kinds: list[str], groups: list[list[str]]) -> list[list[str]]:
    """auto's ranges by name, without repeats."""
    by_kind = {"last_stage": groups[-1], "last_two_stages": [b for g in groups[-2:] for b in g],
               "first_stage": groups[0], "all": [b for g in groups for b in g]}
    out: list[list[str]] = []
    for kind in kinds:
        if by_kind[kind] not in out:
            out.append(by_kind[kind])
    return out


def plan(spec: str | list[str] | None, *, backbone: str, layer: str, kinds: list[str],
         sweep_layer: str | None = None) -> Plan:
    """What trains for `spec` when the head reads `layer`; errors name finetune.blocks and the valid blocks."""
    valid = feeding(backbone, layer)
    if not valid:
        raise WorkflowError(f"finetune: no block of {backbone} feeds {layer}, the layer the head reads; "
                            f"probe a later layer first")
    groups = stages(backbone, valid)
    if spec == "auto":
        chosen = candidates(kinds, groups)
    elif spec is not None:
        chosen = [parse(spec, backbone=backbone, valid=valid, layer=layer)]
    else:
        chosen = [after(sweep_layer, backbone=backbone, valid=valid) or groups[-1]]
    nodes = backbones.node_names(backbone)
    start = min(first_node(nodes, c[0]) for c in chosen)
    return Plan(candidates=chosen, cut=nodes[start - 1] if start else None, node=backbones.taps(backbone)[layer],
                order=valid)


def after(sweep_layer: str | None, *, backbone: str, valid: list[str]) -> list[str]:
    """The blocks after the layer a sweep chose (empty when there is none, or it is the head's own)."""
    if sweep_layer is None or sweep_layer not in backbones.taps(backbone):
        return []
    nodes = backbones.node_names(backbone)
    at = nodes.index(backbones.taps(backbone)[sweep_layer])
    return [b for b in valid if first_node(nodes, b) > at]


def describe(blocks: list[str], order: list[str]) -> str:
    """'features.15:features.18' for a run of consecutive blocks, else the list."""
    if len(blocks) == 1:
        return blocks[0]
    run = order[order.index(blocks[0]) : order.index(blocks[-1]) + 1] == blocks
    return f"{blocks[0]}:{blocks[-1]}" if run else ",".join(blocks)


def param_groups(backbone: nn.Module, head: nn.Module, *, blocks: list[str], order: list[str], lr: float,
                 backbone_lr: float, layer_decay: float | None, weight_decay: float) -> list[dict]:
    """AdamW groups: the head at `lr`, the top block at `backbone_lr`, each block below × layer_decay per block."""
    groups = core.param_groups(head, lr=lr, weight_decay=weight_decay)
    top = order.index(blocks[-1])
    for name in blocks:
        scale = layer_decay ** (top - order.index(name)) if layer_decay else 1.0
        groups += core.param_groups(backbone.get_submodule(name), lr=backbone_lr * scale, weight_decay=weight_decay)
    return groups
