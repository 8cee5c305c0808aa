"""JPEG decode, resize and crop on the backbone's device: nvJPEG and CUDA kernels on a GPU.

JPEG decoding on CPUs starves GPUs (about 390 images/s per thread against thousands on nvJPEG),
so with `extract.decode=device` the CPU tasks only read the bytes and parse each header
(`readers.read_batch`: size, EXIF orientation and the pixel limit). What nvJPEG cannot take
(PNG, WebP, CMYK JPEGs) is decoded on those tasks as before and travels as raw pixels. The
actor then decodes a batch's JPEGs in one call, and resizes and crops them on the device, in
batches of equal size.

A JPEG the device cannot decode (truncated, unusual sampling) is retried with PIL on the
actor's CPU, and only an image that fails there too is quarantined.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from ftl.model import imaging
from ftl.pipeline import readers

# The CPU side of this path, under its old name: it lives in readers.py, on the same row loop as decode_batch.
read_batch = readers.read_batch


class DeviceDecoder:
    """Batches from `readers.read_batch` → (N, crop, crop, 3) uint8 on `device`, plus per-row errors."""

    def __init__(self, pre: imaging.Preprocess, device: str, max_pixels: int):
        import torch

        self.pre, self.device, self.max_pixels = pre, torch.device(device), max_pixels
        imaging.set_pil_limit(max_pixels)  # for the PIL fallback, as on the reader tasks

    def __call__(self, batch: dict[str, np.ndarray], rows: np.ndarray):
        """Decode `rows` of the batch; returns the pixels of those that worked and {row: error}."""
        import torch

        crop = self.pre.crop
        out: dict[int, torch.Tensor] = {}
        failed: dict[int, str] = {}
        raw_rows = [r for r in rows if len(batch["pixels"][r])]
        if raw_rows:  # decoded on CPU tasks: one pinned copy to the device for all of them
            host = np.stack([np.frombuffer(batch["pixels"][r], np.uint8) for r in raw_rows])
            moved = to_device(torch.from_numpy(host).view(-1, crop, crop, 3), self.device)
            out.update(zip(raw_rows, moved))
        jpeg_rows = [r for r in rows if len(batch["jpeg"][r])]
        decoded = self.decode_jpegs([batch["jpeg"][r] for r in jpeg_rows])
        by_shape = defaultdict(list)  # images of one size resize as one batch
        for r, img in zip(jpeg_rows, decoded):
            if isinstance(img, Exception):
                try:  # what the device cannot decode, PIL may: the image is not lost
                    pixels = imaging.decode_one(batch["jpeg"][r], self.pre, max_pixels=self.max_pixels)[0]
                    out[r] = to_device(torch.from_numpy(pixels), self.device)
                except Exception as e:
                    failed[r] = f"{type(e).__name__}: {e} (device decode: {img})"
                continue
            img = orient(img, int(batch["orientation"][r]))
            by_shape[tuple(img.shape)].append((r, img))
        for group in by_shape.values():
            fitted = resize_crop(torch.stack([img for _, img in group]), self.pre)
            out.update(zip([r for r, _ in group], fitted))
        ok = [r for r in rows if r in out]
        pixels = torch.stack([out[r] for r in ok]) if ok else torch.empty((0, crop, crop, 3), dtype=torch.uint8)
        return ok, pixels, failed

    def decode_jpegs(self, blobs: list[bytes]) -> list:
        """All at once (nvJPEG batches them); after a failure, one by one to find the culprit."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if not blobs:
            return []
        # Inputs must be CPU tensors whatever the device; bytearray gives torch a writable buffer.
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 flags its decoders for a later move
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass
            got = []
            for d in data:
                try:
                    got.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as e:
                    got.append(e)
            return got


def to_device(x, device):
    """Pinned, non-blocking host→device copy on GPUs; a no-op on CPU."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


def orient(img, orientation: int):
    """Apply an EXIF orientation to a (3, H, W) tensor, as PIL.ImageOps.exif_transpose does."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def resize_crop(images, pre: imaging.Preprocess):
    """(N, 3, H, W) uint8 → shorter side to `resize` (antialiased bilinear), centre `crop`, as (N, crop, crop, 3)."""
    import torchvision.transforms.v2.functional as F

    resized = F.resize(images, [pre.resize], antialias=True)
    return F.center_crop(resized, [pre.crop, pre.crop]).permute(0, 2, 3, 1)
