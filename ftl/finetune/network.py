"""The network fine-tuning trains: the backbone cut into a frozen prefix and a suffix that holds the trained
blocks, pooled at the probe's layer, then the probe's head.

The split is made on the torch.fx graph that torchvision's feature extraction traces (the same
graph the extraction's Tap runs), so it works for any backbone whose blocks are stages of one
path: the suffix's graph takes the activation at the cut as its input. The prefix and suffix
graphs hold the backbone's own modules, not copies: training the suffix trains the backbone,
whose state_dict is what the registered image model loads.
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from ftl.errors import LayerError
from ftl.finetune.job import NetSpec
from ftl.model import backbones, heads

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def graph_to(model: nn.Module, node: str) -> fx.Graph:
    """The eval-mode graph from the image to `node`, whose output is {"out": tensor}."""
    return backbones.extractor(model.eval(), {node: "out"}).eval_graph


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "output").args[0]["out"]


def cut_graph(model: nn.Module, *, cut: str, node: str) -> fx.Graph:
    """The graph from the activation at the `cut` node to `node`: the cut becomes its only input."""
    graph = graph_to(model, node)
    # Both graphs come from the same tracing of the same model, so fx names the cut node alike in each.
    name = output_node(graph_to(model, cut)).name
    target = next(n for n in graph.nodes if n.name == name)
    # The image is the first input; others (a timm ViT's attn_mask, is_causal) keep their defaults.
    inputs = [n for n in graph.nodes if n.op == "placeholder"][:1]
    with graph.inserting_before(next(iter(graph.nodes))):
        placeholder = graph.placeholder("cut")
    target.replace_all_uses_with(placeholder)
    graph.eliminate_dead_code()
    # Checks on the image that lead nowhere (timm's patch embedding asserts the input size) go with it.
    reads = set(inputs)
    for n in graph.nodes:
        if any(a in reads for a in n.all_input_nodes):
            reads.add(n)
    for n in reversed(list(graph.nodes)):
        if n in reads and n not in inputs and not n.users and n.op != "output":
            graph.erase_node(n)
    if any(n.users for n in inputs):
        raise LayerError(f"cannot cut {type(model).__name__} at {cut}: later nodes read the image itself; "
                         f"train a range that starts at a stage boundary")
    for n in inputs:
        graph.erase_node(n)
    return graph


def module_of(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule that runs `graph` with the model's own submodules (shared, not copied)."""
    gm = fx.GraphModule(model, graph)
    gm.recompile()
    return gm


class Finetuned(nn.Module):
    """images (uint8 NHWC) or cut activations → suffix → pooled layer → head → logits.

    The backbone and head are its submodules, so its state_dict is theirs; the prefix and suffix
    graphs are kept outside the module tree because they hold the same modules again.
    """

    def __init__(self, backbone: nn.Module, head: heads.Head, *, cut: str | None, node: str, pooling: str,
                 mean, std, freeze_bn: bool, inputs: str):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.pooling, self.inputs, self.freeze_bn = pooling, inputs, freeze_bn
        self.prefix_tokens = backbones.prefix_tokens(backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)
        prefix = module_of(backbone, graph_to(backbone, cut)) if cut else None
        suffix = module_of(backbone, cut_graph(backbone, cut=cut, node=node) if cut else graph_to(backbone, node))
        object.__setattr__(self, "graphs", (prefix, suffix))
        self.set_trainable([])

    def set_trainable(self, blocks: list[str]) -> None:
        """Only these blocks (BatchNorm aside when frozen) and the head take gradients."""
        self.trained = [self.backbone.get_submodule(b) for b in blocks]
        self.backbone.requires_grad_(False)
        for block in self.trained:
            block.requires_grad_(True)
            for m in block.modules():
                if self.freeze_bn and isinstance(m, BATCHNORMS):
                    m.requires_grad_(False)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Finetuned:
        """Train mode reaches the trained blocks and the head only: the frozen parts keep their statistics."""
        super().train(mode)
        self.backbone.eval()
        for block in self.trained:
            block.train(mode)
            for m in block.modules():
                if self.freeze_bn and isinstance(m, BATCHNORMS):
                    m.eval()
        return self

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC → the activation at the cut, without gradients (normalised images when nothing is frozen)."""
        with torch.no_grad():
            x = images.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).float()
            x = (x - self.mean) / self.std
            return self.graphs[0](x)["out"] if self.graphs[0] is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "pixels":
            x = self.prefix(x)
        x = x.float()
        if x.ndim == 4:  # image-like activations; a ViT's cut is a token sequence
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.graphs[1](x)["out"]
        return self.head(backbones.pool(out, self.pooling, prefix=self.prefix_tokens).float())


def build(spec: NetSpec, states: dict, *, inputs: str) -> Finetuned:
    """The probe's backbone and head from `spec` and `states` (by value: nothing is read from the driver's disk)."""
    backbone = backbones.build(spec.backbone, spec.crop)
    backbone.load_state_dict(states["backbone_state"])
    head = heads.build(spec.head, states["head_state"])
    return Finetuned(backbone, head, cut=spec.cut, node=spec.node, pooling=spec.pooling, mean=spec.mean,
                     std=spec.std, freeze_bn=spec.freeze_bn, inputs=inputs)


class Chunked(nn.Module):
    """Evaluates a whole split in chunks, so that core.validate can take it as one tensor."""

    def __init__(self, net: nn.Module, *, batch_size: int, device: torch.device, autocast=contextlib.nullcontext):
        super().__init__()
        self.net, self.batch_size, self.device, self.autocast = net, batch_size, device, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), self.batch_size):
            with self.autocast():
                out.append(self.net(x[i : i + self.batch_size].to(self.device, non_blocking=True)).float())
        return torch.cat(out) if out else torch.zeros(0, self.net.head.config["classes"], device=self.device)
