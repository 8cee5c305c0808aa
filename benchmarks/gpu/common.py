"""What the GPU scripts share: their common options and the settings ftl's contenders take."""

from __future__ import annotations

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="random", help="random: the same throughput, nothing to download")
    p.add_argument("--root", required=True, help="an imagefolder from benchmarks/images.py")
    p.add_argument("--device", default="cuda")
    return p


def settings(args, **over) -> dict:
    """The settings dict of benchmarks/contenders/common.py; no output is written here."""
    return {"root": args.root, "backbone": args.backbone, "weights": args.weights, "layers": [], "batch": None,
            "device": args.device, "precision": "auto", "compile": False, "decode": "auto", "threads": None,
            "output": "-", "tracking_uri": "-"} | over
