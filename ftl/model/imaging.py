"""Image bytes to model input: header checks, EXIF orientation, RGB, resize and centre crop.

Ray-free and MLflow-free: the registered image model decodes with exactly this code.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Preprocess:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TooLarge(ValueError):
    """Dimensions over the decompression-bomb limit."""


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
