"""README's table of `ftl layers` for the representative set: blocks, sweep stages, pre_logits, pooled dims.

Run: .venv/bin/python benchmarks/layers_table.py (random weights; no network)
"""
from ftl.model import backbones

SET = ["timm/vit_small_patch14_dinov2.lvd142m", "timm/vit_base_patch16_clip_224.openai",
       "timm/convnextv2_atto.fcmae_ft_in1k", "timm/efficientnetv2_rw_t.ra2_in1k", "mobilenet_v2"]
print("| backbone | input | blocks (fine-tuning) | sweep stages | pre_logits / penultimate dim | a block's output | pooled dims (avg; cls_patch_avg) |")
print("|---|---|---|---|---|---|---|")
for name in SET:
    crop = backbones.preprocess_defaults(name)["crop"]
    shapes = backbones.layer_shapes(name)
    blocks = backbones.blocks_of(name)
    d = backbones.default_layer(name)
    last = blocks[-1]
    tok = len(shapes[last]) == 3
    pooled = f"{backbones.pooled_dim(shapes[last], 'avg')}" + (f"; {backbones.pooled_dim(shapes[last], 'cls_patch_avg')}" if tok else "")
    print(f"| `{name}` | {crop} | `{blocks[0]}` … `{last}` ({len(blocks)}) | {', '.join('`'+s+'`' for s in backbones.stage_layers(name))} | `{d}`: {shapes[d][1]} | `{last}`: {tuple(shapes[last][1:])} | {pooled} |")
