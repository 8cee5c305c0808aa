"""What the contender processes share: their settings, the model ftl would build, and how they report.

A contender is started as `python benchmarks/contenders/<name>.py SETTINGS.json` and ends by
printing one line `BENCH {json}` with wall-clock marks (time.time(), so that the parent can set
them against the moment it started the process).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

# Marks before anything heavy is imported: the parent subtracts its own launch time.
STARTED = time.time()


def settings() -> dict:
    return json.loads(Path(sys.argv[1]).read_text())


def report(**values) -> None:
    print("BENCH " + json.dumps(values), flush=True)


def workflow_data(s: dict) -> dict:
    """The workflow every ftl run of the benchmark uses (also written as YAML for the CLI)."""
    extract = {"output": s["output"], "backbone": s["backbone"], "weights": s["weights"], "layers": s["layers"],
               "batch_size": s["batch"], "device": s["device"], "precision": s["precision"],
               "compile": s["compile"], "decode": s["decode"]}
    if s.get("crop"):  # a ViT-S/14 at 224 rather than DINOv2's 518, where a CPU must run it
        extract["preprocess"] = {"resize": s["crop"], "crop": s["crop"]}
    return {"name": "bench", "source": {"uri": s["root"], "format": "imagefolder"}, "extract": extract,
            "tracking": {"uri": s["tracking_uri"]}}


def model(s: dict):
    """(tap on its device, ModelSpec, provenance): the same tapped backbone an ftl actor builds."""
    import torch

    from ftl import config
    from ftl.extract import embed, stage
    from ftl.pipeline import runtime

    spec, prov = stage.model_spec(config.validate(workflow_data(s), source="benchmark"))
    torch.set_num_threads(s["threads"])
    tap = runtime.place(embed.build_tap(spec, channels_last=True, storage_options=None), device=s["device"],
                        channels_last=True, compile=s["compile"])
    return tap, spec, prov


def autocast(s: dict):
    """The numerics ftl's actors run with: bf16 on GPUs unless pinned, fp32 on CPUs."""
    import torch

    from ftl.pipeline import runtime

    precision = s["precision"]
    if precision == "auto":
        precision = "bf16" if s["device"] == "cuda" else "fp32"
    dtype = runtime.AUTOCAST[precision]
    return torch.autocast(s["device"], dtype=dtype) if dtype else contextlib.nullcontext()


def max_pixels() -> int:
    from ftl.config import ExtractConfig

    return ExtractConfig(output="-").max_image_pixels
