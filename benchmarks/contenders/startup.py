"""What an `ftl extract` run spends before its first batch, part by part, each measured on its own.

Imports are timed in fresh interpreters (a module imported once is free the second time), the
rest in this process in the order a run does them. Prints `BENCH {part: seconds}`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contenders import common

# (label, modules imported before the clock starts, modules timed)
IMPORTS = [
    ("python start", "", "pass"),
    ("import the CLI (ftl.cli)", "", "import ftl.cli"),
    ("driver imports for extract (ftl.extract.stage)", "import ftl.cli", "import ftl.extract.stage"),
    ("actor imports torch, torchvision, ftl (after ray.data)", "import ray.data", "import ftl.extract.embed"),
    ("torch._dynamo alone, after torch (torchvision.ops imports it)", "import torch", "import torch._dynamo"),
]


def timed_import(before: str, what: str) -> float:
    code = f"import time\n{before}\nt = time.perf_counter()\n{what}\nprint(time.perf_counter() - t)"
    if what == "pass":  # the interpreter's own start, timed from outside
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        return time.perf_counter() - t
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    s = common.settings()
    parts = {label: timed_import(before, what) for label, before, what in IMPORTS}
    from ftl import config
    from ftl.extract import embed, stage
    from ftl.io import incremental, storage
    from ftl.io.sink import FEATURES, QUARANTINE
    from ftl.pipeline import runtime
    from ftl.pipeline.runtime import ensure_ray

    wf = config.validate(common.workflow_data(s), source="benchmark")
    clock = time.perf_counter()

    def lap(label: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[label] = now - clock
        clock = now

    spec, _ = stage.model_spec(wf)
    lap("plan: weights sha256, layer dims")
    images, _ = stage.list_source(wf)
    lap("listing")
    with tempfile.TemporaryDirectory() as tmp:
        incremental.diff(images, storage.locate(tmp), (FEATURES, QUARANTINE))
    lap("diff against the output")
    ensure_ray()
    lap("ray.init (local runtime)")
    tap = runtime.place(embed.build_tap(spec, channels_last=True, storage_options=None), device=s["device"],
                        channels_last=True, compile=False)
    lap("model load in the actor (build_tap, place)")
    import torch

    with torch.inference_mode():
        tap(torch.zeros((s["batch"], spec.preprocess.crop, spec.preprocess.crop, 3), dtype=torch.uint8,
                        device=s["device"]))
    lap("first forward (oneDNN/cuDNN set-up and one batch)")
    common.report(**parts)


if __name__ == "__main__":
    main()
