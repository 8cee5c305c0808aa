"""Image bytes to model input: header checks, EXIF orientation, RGB, resize and centre crop.

Ray-free and MLflow-free: the registered image model decodes with exactly this code.

ftl enforces its pixel limit itself, from the header, before any pixel is decoded. PIL's own
decompression-bomb guard is never switched off: processes that decode for a pipeline set it to
ftl's limit once (`set_pil_limit`); a process that serves the model keeps the limit it has.
"""

from __future__ import annotations

import io
import math
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ftl.errors import FtlError

EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height on display


@dataclass(frozen=True)
class Preprocess:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class BadImage(FtlError, ValueError):
    """Bytes that ftl will not decode; the message says why."""


class TooLarge(BadImage):
    """Dimensions over the decompression-bomb limit."""


@dataclass(frozen=True)
class Header:
    """What an image's header says, before any pixel is decoded."""

    format: str | None
    mode: str
    size: tuple[int, int]  # as stored
    orientation: int  # EXIF orientation 1..8; 1 when absent or invalid

    @property
    def width(self) -> int:
        """Width as displayed, after the EXIF rotation."""
        return self.size[1] if self.orientation in TRANSPOSED else self.size[0]

    @property
    def height(self) -> int:
        """Height as displayed, after the EXIF rotation."""
        return self.size[0] if self.orientation in TRANSPOSED else self.size[1]


def set_pil_limit(max_pixels: int) -> None:
    """PIL's decompression-bomb guard at ftl's limit, in a process that decodes for a pipeline."""
    # A number, never None: PIL's guard also covers what ftl's header check cannot see (GIF frames, TIFF tiles).
    if Image.MAX_IMAGE_PIXELS != max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


# catch_warnings swaps the process's warning filters: two threads interleaving it could leave ours behind.
_WARNINGS = threading.Lock()


def open_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, Header]:
    """PIL's lazy image and its header; empty files and images over `max_pixels` raise, undecoded."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        # Between its limit and twice that, PIL only warns and decodes anyway: here it refuses.
        with _WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # One limit in the reason, ftl's: PIL's guard stands at it (set_pil_limit).
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found[1]):,} pixels" if found else "its pixel count"
        raise TooLarge(f"{pixels} exceeds extract.max_image_pixels={max_pixels}") from None
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    header = Header(img.format, img.mode, img.size, orientation if orientation in range(1, 9) else 1)
    width, height = header.size
    if width * height > max_pixels:
        raise TooLarge(f"{width}x{height} pixels exceeds extract.max_image_pixels={max_pixels}")
    return img, header


def decode(img: Image.Image, *, header: Header, pre: Preprocess) -> np.ndarray:
    """An image from `open_image` → (crop, crop, 3) uint8, upright."""
    if header.format == "JPEG":
        # DCT-domain downscaling: decode at 1/2, 1/4, 1/8 size when that still covers `resize`.
        width, height = header.size
        scale = pre.resize / min(width, height)
        img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return resize_crop(to_rgb(ImageOps.exif_transpose(img)), pre)


def decode_one(data: bytes, pre: Preprocess, *, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Bytes → (crop, crop, 3) uint8 plus the width and height as displayed (after EXIF rotation)."""
    img, header = open_image(data, max_pixels=max_pixels)
    return decode(img, header=header, pre=pre), header.width, header.height


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


def resize_crop(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Shorter side to `resize`, then a centre `crop`, in one resampling pass over the crop box."""
    w, h = img.size
    scale = pre.resize / min(w, h)
    left = round((w * scale - pre.crop) / 2)
    top = round((h * scale - pre.crop) / 2)
    box = (left / scale, top / scale, (left + pre.crop) / scale, (top + pre.crop) / scale)
    out = img.resize((pre.crop, pre.crop), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)
