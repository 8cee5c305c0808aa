"""Resumable state on disk as tensors and JSON: a checkpoint that loading can never turn into running code.

A checkpoint directory is often a shared prefix (finetune.checkpoints on S3). A pickle there is
code that runs on resume, so the state is split instead: every tensor goes into one safetensors
file under a generated key, and the rest of the tree (dicts with their key types, lists, tuples,
numbers, strings) into JSON that names those keys. Loading reads both and puts the tree back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

TENSORS, TREE = "state.safetensors", "state.json"


def save(tree: Any, folder: str) -> None:
    """Write `tree` into `folder` as state.safetensors + state.json."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = encode(tree, tensors)
    save_file(tensors, os.path.join(folder, TENSORS))
    with open(os.path.join(folder, TREE), "w") as f:
        json.dump(encoded, f)


def load(folder: str) -> Any:
    """The tree `save` wrote into `folder`, tensors on the CPU."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, TENSORS))
    with open(os.path.join(folder, TREE)) as f:
        return decode(json.load(f), tensors)


def encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        # safetensors refuses views that share storage (a state dict's tied weights): own copies.
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: encode(v, tensors) for k, v in value.items()}}
        # An optimizer's state is keyed by parameter index: JSON would turn those into strings.
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint: only tensors and JSON values")


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__dict__" in value:
        return {k: decode(v, tensors) for k, v in value["__dict__"].items()}
    if "__items__" in value:
        return {decode(k, tensors): decode(v, tensors) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(decode(v, tensors) for v in value["__tuple__"])
    raise ValueError(f"not a checkpoint tree: a dict with keys {sorted(value)[:5]}")
