"""Fine-tuning's plan without training: block names and ranges, the split network, costs, config errors."""

from __future__ import annotations

import pytest
import torch

from ftl.cli import main
from ftl.errors import WorkflowError
from ftl.finetune import blocks, cost, network
from ftl.model import backbones, heads
from tests.conftest import write_workflow


@pytest.mark.parametrize("override, message", [
    ("finetune.blocks=features.99:", ("finetune.blocks: unknown block 'features.99' for mobilenet_v2; valid: "
                                      "features.0, features.1, features.2")),
    ("finetune.blocks=[features.17, layer4]", "finetune.blocks[1]: unknown block 'layer4' for mobilenet_v2"),
    ("finetune.blocks=features.1::3", "finetune.blocks: Value error, give one block (features.14), an inclusive range"),
    ("finetune.precision=fp16", "finetune.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    ("finetune.lr_decay=0.7", "finetune.lr_decay: unknown key; valid keys here: probe, blocks, auto_candidates, lr"),
    ("finetune.cache_prefix=true", "finetune.cache_prefix: the frozen prefix's output is reused every epoch"),
])
def test_config_errors_name_the_key_and_the_choices(tmp_path, override, message, capsys):
    wf = write_workflow(tmp_path / "bad.yaml", name="bad", source={"uri": str(tmp_path)},
                        extract={"output": str(tmp_path / "out")})
    assert main(["finetune", str(wf), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_blocks_default_auto_ranges_and_layer_decay():
    plan = blocks.plan(None, backbone="mobilenet_v2", layer="flatten", kinds=[])
    assert plan.candidates == [["features.15", "features.16", "features.17", "features.18"]]
    assert plan.cut == "features.14.conv.3"  # the input of features.15: where the frozen prefix ends
    after_sweep = blocks.plan(None, backbone="mobilenet_v2", layer="flatten", kinds=[], sweep_layer="features.11")
    assert after_sweep.candidates[0][0] == "features.12" and after_sweep.candidates[0][-1] == "features.18"
    auto = blocks.plan("auto", backbone="resnet18", layer="flatten", kinds=["last_stage", "last_two_stages",
                                                                           "first_stage"])
    assert auto.candidates == [["layer4"], ["layer3", "layer4"], ["layer1"]] and auto.cut == "maxpool"
    assert blocks.plan(["layer2", "layer4"], backbone="resnet18", layer="flatten", kinds=[]).candidates == [
        ["layer2", "layer4"]]
    with pytest.raises(WorkflowError, match="features.16 comes after features.14, the layer the head reads"):
        blocks.plan("features.16", backbone="mobilenet_v2", layer="features.14", kinds=[])
    model, head = backbones.build("resnet18"), heads.Head(512, 3)
    groups = blocks.param_groups(model, head, blocks=["layer2", "layer3", "layer4"], order=["layer1", "layer2",
                                 "layer3", "layer4"], lr=1e-3, backbone_lr=1e-4, layer_decay=0.5, weight_decay=0.1)
    lrs = sorted({g["lr"] for g in groups}, reverse=True)
    assert lrs == pytest.approx([1e-3, 1e-4, 5e-5, 2.5e-5])  # head, layer4, layer3, layer2


@pytest.mark.parametrize("name, block, layer, size", [("mobilenet_v2", "features.12", "flatten", 64),
                                                     ("resnet18", "layer3", "flatten", 64),
                                                     ("timm/vit_small_patch14_dinov2.lvd142m", "blocks.9",
                                                      "pre_logits", 56)])
def test_the_split_network_is_the_tap_and_trains_only_its_blocks(name, block, layer, size):
    torch.manual_seed(0)
    model = backbones.build(name, size)
    dim = backbones.layer_dims(name, [layer], pooling="avg", size=size)[layer]
    head, mean, std = heads.Head(dim, 4), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.randint(0, 256, (6, size, size, 3), dtype=torch.uint8)
    tap = backbones.tap(name, model, [layer], pooling="avg", mean=mean, std=std, channels_last=True)
    with torch.no_grad():
        expected = head(tap(images)[layer])
    plan = blocks.plan(f"{block}:", backbone=name, layer=layer, kinds=[])
    net = network.Finetuned(model, head, cut=plan.cut, node=plan.node, pooling="avg", mean=mean, std=std,
                            freeze_bn=True, inputs="pixels")
    net.set_trainable(plan.candidates[0])
    with torch.no_grad():
        assert torch.allclose(net.eval()(images), expected, atol=1e-4)
        net.inputs = "cut"  # the cached path: the prefix's output in fp16, then the suffix
        assert torch.allclose(net(net.prefix(images).half()), expected, atol=5e-2)
    net.inputs = "pixels"
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    net.train()(images).sum().backward()
    trained = {f"backbone.{n}" for b in plan.candidates[0]
               for n, _ in model.get_submodule(b).named_parameters(prefix=b)}
    grads = {n for n, p in net.named_parameters() if p.grad is not None}
    assert {n for n in grads if n.startswith("backbone.")} <= trained and "head.net.0.weight" in grads
    assert any(n.startswith(f"backbone.{block}.") and n.endswith(".weight") for n in grads)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # BatchNorm frozen: no update


def test_each_candidates_cost_is_said_and_an_uncached_plan_is_named():
    from ftl.config.finetune import FinetuneConfig
    from ftl.finetune import blocks

    cfg = FinetuneConfig(epochs=10, cache_prefix=True, augment=False)
    both = blocks.plan("auto", backbone="mobilenet_v2", layer="flatten", kinds=["last_stage", "first_stage"])
    lines = cost.before(both, cfg, images=3000)
    assert lines[0].startswith("finetune: candidate 1/2 features.15:features.18: up to 10 epochs × 3,000 images")
    assert "starts at the input, so the frozen prefix is empty and nothing is cached" in lines[-1]
    top = blocks.plan("auto", backbone="mobilenet_v2", layer="flatten", kinds=["last_stage", "last_two_stages"])
    said = cost.before(top, cfg, images=3000)
    assert not any("nothing is cached" in line for line in said) and top.cut in said[-1]


def test_the_whole_backbone_trains_with_layer_decay_unless_told_otherwise():
    from ftl.config.finetune import FinetuneConfig
    from ftl.finetune import blocks

    whole = blocks.plan("auto", backbone="mobilenet_v2", layer="flatten", kinds=["last_stage", "all"])
    top, every = whole.candidates
    cfg = FinetuneConfig(cache_prefix=False)
    assert blocks.layer_decay(cfg, every, whole.order) == blocks.WHOLE_BACKBONE_LAYER_DECAY
    assert blocks.layer_decay(cfg, top, whole.order) is None
    assert blocks.layer_decay(FinetuneConfig(layer_decay=0.9), every, whole.order) == 0.9
    lines = cost.before(whole, cfg, images=100)
    assert lines[1].endswith("19 of 19 blocks trained, layer decay 0.75") and "layer decay" not in lines[0]
