"""Read and decode images on CPU tasks: bytes → RGB uint8, resized and centre-cropped.

A bad image never raises out of here: it comes back with `stage` and `error` set, so that
the sink can quarantine it and every listed image is accounted for.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from ftl import storage


@dataclass(frozen=True)
class Preprocess:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TooLarge(ValueError):
    """Dimensions over the decompression-bomb limit."""


def read_all(uris: list[str], storage_options: dict | None) -> list[bytes | Exception]:
    """Fetch many objects; s3fs fetches a list concurrently, and errors come back per object."""
    if not uris:
        return []
    loc = storage.locate(uris[0], storage_options)
    paths = [storage.strip_scheme(u) for u in uris]
    got = loc.fs.cat(paths, on_error="return")
    return [got.get(p, FileNotFoundError(p)) for p in paths]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit scaled down, alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_one(data: bytes, pre: Preprocess, *, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Bytes → (crop, crop, 3) uint8 plus the original width and height (after EXIF rotation)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    # ftl enforces extract.max_image_pixels itself, from the header, before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} pixels exceeds extract.max_image_pixels={max_pixels}")
    if img.format == "JPEG":
        # DCT-domain downscaling: decode at 1/2, 1/4, 1/8 size when that still covers `resize`.
        scale = pre.resize / min(width, height)
        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says: rotated by 90 degrees
        width, height = height, width
    img = to_rgb(ImageOps.exif_transpose(img))
    return resize_crop(img, pre), width, height


def resize_crop(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Shorter side to `resize`, then a centre `crop`, in one resampling pass over the crop box."""
    w, h = img.size
    scale = pre.resize / min(w, h)
    left = round((w * scale - pre.crop) / 2)
    top = round((h * scale - pre.crop) / 2)
    box = (left / scale, top / scale, (left + pre.crop) / scale, (top + pre.crop) / scale)
    out = img.resize((pre.crop, pre.crop), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def blobs(batch: pa.Table, storage_options: dict | None) -> tuple[list[bytes | Exception], np.ndarray]:
    """Each row's bytes (or the error reading them), and which rows are already done."""
    n = batch.num_rows
    done = batch["done"].to_numpy(zero_copy_only=False) if "done" in batch.column_names else np.zeros(n, bool)
    if "data" in batch.column_names:  # WebDataset: the bytes came inline from the shard
        return batch["data"].to_pylist(), done
    try:
        return read_all(batch["uri"].to_pylist(), storage_options), done
    except Exception as e:  # the whole request failed: every image of the batch is unreadable
        return [e] * n, done


def decode_batch(batch: pa.Table, *, pre: Preprocess, max_pixels: int, storage_options: dict | None) -> pa.Table:
    """A Ray Data batch of listed images → pixels, sizes, and per-row errors."""
    n = batch.num_rows
    pixels = np.zeros((n, pre.crop, pre.crop, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    # "" means no error: all-None object columns do not survive Ray's numpy→Arrow conversion.
    stage = np.full(n, "", dtype=object)
    error = np.full(n, "", dtype=object)
    data, done = blobs(batch, storage_options)
    for i, blob in enumerate(data):
        if done[i]:  # already in the output: carried only to be counted
            stage[i] = "done"
            continue
        if isinstance(blob, Exception):
            stage[i], error[i] = "read", f"{type(blob).__name__}: {blob}"
            continue
        try:
            pixels[i], width[i], height[i] = decode_one(blob, pre, max_pixels=max_pixels)
        except Exception as e:  # any decoder failure quarantines this image only
            stage[i], error[i] = "decode", f"{type(e).__name__}: {e}"
    from ray.data.extensions import ArrowTensorArray  # here, so the pyfunc model needs no Ray to decode

    return with_status(batch.select(["image_id", "uri", "label", "split"]).append_column(
        "pixels", ArrowTensorArray.from_numpy(pixels)
    ), width, height, stage, error)


def with_status(table: pa.Table, width, height, stage, error) -> pa.Table:
    return table.append_column("width", pa.array(width, pa.int32())).append_column(
        "height", pa.array(height, pa.int32())
    ).append_column("stage", pa.array(stage, pa.string())).append_column("error", pa.array(error, pa.string()))
