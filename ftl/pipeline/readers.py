"""Reader tasks: a batch of listed images -> bytes -> decoded pixels or per-row errors.

A bad image never raises out of here: it comes back with `stage` and `error` set, so that
the sink can quarantine it and every listed image is accounted for.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ftl.io import storage
from ftl.model import imaging


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


def decode_batch(batch: pa.Table, *, pre: imaging.Preprocess, max_pixels: int, storage_options: dict | None) -> pa.Table:
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
            pixels[i], width[i], height[i] = imaging.decode_one(blob, pre, max_pixels=max_pixels)
        except Exception as e:  # any decoder failure quarantines this image only
            stage[i], error[i] = "decode", f"{type(e).__name__}: {e}"
    from ray.data.extensions import (
        ArrowTensorArray,  # here, so the pyfunc model needs no Ray to decode
    )

    return with_status(batch.select(["image_id", "uri", "label", "split"]).append_column(
        "pixels", ArrowTensorArray.from_numpy(pixels)
    ), width, height, stage, error)


def with_status(table: pa.Table, width, height, stage, error) -> pa.Table:
    return table.append_column("width", pa.array(width, pa.int32())).append_column(
        "height", pa.array(height, pa.int32())
    ).append_column("stage", pa.array(stage, pa.string())).append_column("error", pa.array(error, pa.string()))
