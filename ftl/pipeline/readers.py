"""Reader tasks: a batch of listed images → bytes → what the actors need, or per-row errors.

Both readers share one row loop (`each_row`): `decode_batch` decodes with PIL here, and
`read_batch` (extract.decode=device) parses only the headers here and leaves JPEGs to the
actor's device (ftl/pipeline/device_decode.py). A bad image never raises out of here: it comes
back with `stage` and `error` set, so that the sink can quarantine it and every listed image is
accounted for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ftl.io import schema, storage
from ftl.model import imaging

READ, DECODE = "read", "decode"  # the stages a reader marks a failed row with
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG decodes to RGB; CMYK/YCCK go to PIL


def read_all(uris: list[str], storage_options: dict | None) -> list[bytes | Exception]:
    """Fetch many objects; s3fs fetches a list concurrently, and errors come back per object."""
    if not uris:
        return []
    loc = storage.locate(uris[0], storage_options)
    paths = [storage.strip_scheme(u) for u in uris]
    got = loc.fs.cat(paths, on_error="return")
    return [got.get(p, FileNotFoundError(p)) for p in paths]


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


def reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def each_row(batch: pa.Table, *, fill: Callable[[int, bytes], None], max_pixels: int,
             storage_options: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Read the batch, call `fill(row, bytes)` on each row to do; returns `stage` and `error` per row."""
    imaging.set_pil_limit(max_pixels)  # a no-op after a worker's first batch
    n = batch.num_rows
    stage = np.full(n, schema.ERROR_NONE, dtype=object)
    error = np.full(n, schema.ERROR_NONE, dtype=object)
    data, done = blobs(batch, storage_options)
    for i, blob in enumerate(data):
        if done[i]:  # already in the output: carried only to be counted
            stage[i] = schema.STAGE_DONE
        elif isinstance(blob, Exception):
            stage[i], error[i] = READ, reason(blob)
        else:
            try:
                fill(i, blob)
            except Exception as e:  # any decoder failure quarantines this image only
                stage[i], error[i] = DECODE, reason(e)
    return stage, error


def decode_batch(batch: pa.Table, *, pre: imaging.Preprocess, max_pixels: int,
                 storage_options: dict | None) -> pa.Table:
    """A Ray Data batch of listed images → pixels, sizes, and per-row errors."""
    n = batch.num_rows
    pixels = np.zeros((n, pre.crop, pre.crop, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)

    def fill(i: int, blob: bytes) -> None:
        pixels[i], width[i], height[i] = imaging.decode_one(blob, pre, max_pixels=max_pixels)

    stage, error = each_row(batch, fill=fill, max_pixels=max_pixels, storage_options=storage_options)
    # Imported here: ray.data takes seconds to import, and only reader tasks need its tensor type.
    from ray.data.extensions import ArrowTensorArray

    columns = {"pixels": ArrowTensorArray.from_numpy(pixels)}
    return table(batch, columns=columns, width=width, height=height, stage=stage, error=error)


def read_batch(batch: pa.Table, *, pre: imaging.Preprocess, max_pixels: int,
               storage_options: dict | None) -> pa.Table:
    """extract.decode=device: JPEG bytes (and EXIF orientation) for the actor's device, or CPU-decoded raw pixels."""
    n = batch.num_rows
    jpeg, raw = [b""] * n, [b""] * n
    orientation = np.ones(n, dtype=np.int8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)

    def fill(i: int, blob: bytes) -> None:
        img, header = imaging.open_image(blob, max_pixels=max_pixels)
        if for_device(blob, header=header):
            jpeg[i], orientation[i] = blob, header.orientation
        else:  # what nvJPEG cannot take travels as raw pixels, decoded here as on the CPU path
            raw[i] = imaging.decode(img, header=header, pre=pre).tobytes()
        width[i], height[i] = header.width, header.height

    stage, error = each_row(batch, fill=fill, max_pixels=max_pixels, storage_options=storage_options)
    columns = {"jpeg": pa.array(jpeg, pa.binary()), "pixels": pa.array(raw, pa.binary()),
               "orientation": pa.array(orientation)}
    return table(batch, columns=columns, width=width, height=height, stage=stage, error=error)


def for_device(blob: bytes, *, header: imaging.Header) -> bool:
    """A JPEG that nvJPEG decodes to RGB, and one that is whole."""
    return header.format == "JPEG" and header.mode in DEVICE_MODES and complete(blob)


def complete(jpeg: bytes) -> bool:
    """Ends in an EOI marker (padding aside). Decoders differ on cut-off files: some fill the
    rest with grey. PIL refuses them, so they go to PIL, which quarantines them as truncated."""
    return jpeg.rstrip(b"\0")[-2:] == b"\xff\xd9"


def table(batch: pa.Table, *, columns: dict[str, pa.Array], width: np.ndarray, height: np.ndarray,
          stage: np.ndarray, error: np.ndarray) -> pa.Table:
    """The pass-through columns, the reader's own, then sizes and row status."""
    return pa.table({
        **{c: batch[c] for c in schema.PASSTHROUGH},
        **columns,
        "width": pa.array(width, pa.int32()),
        "height": pa.array(height, pa.int32()),
        "stage": pa.array(stage, pa.string()),
        "error": pa.array(error, pa.string()),
    })
