"""Reader tasks: a batch of listed images → bytes → what the actors need, or per-row errors.

Both readers share one row loop (`each_row`): `decode_batch` decodes with PIL here, and
`read_batch` (extract.decode=device) parses only the headers here and leaves JPEGs to the
actor's device (ftl/pipeline/device_decode.py). A bad image never raises out of here: it comes
back with `stage` and `error` set, so that the sink can quarantine it and every listed image is
accounted for.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ftl.io import retry, schema, storage
from ftl.model import imaging
from ftl.secrets import mask_text

READ, DECODE = "read", "decode"  # the stages a reader marks a failed row with
READ_ATTEMPTS = retry.OUTAGE_ATTEMPTS  # fetches of an object whose reads fail for a passing reason
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG decodes to RGB; CMYK/YCCK go to PIL


def read_all(uris: list[str], storage_options: dict | None, *, attempts: int = READ_ATTEMPTS,
             cap: int | None = None) -> list:
    """Fetch many objects (s3fs fetches a list concurrently); errors come back per object.

    A batch may mix filesystems (a manifest naming s3:// and https:// images): each one's URIs
    are fetched together, by that filesystem, in its own path form, so one scheme's rows never
    fail for another's. Objects that failed for a passing reason (timeouts, throttling, 5xx)
    are fetched again, a bounded number of times with backoff; what still fails comes back as
    its last error. With `cap`, at most cap + 1 bytes of each object are read, and one that has
    more comes back as TooBig: the byte limit holds for objects whose size the listing did not give.
    """
    groups: dict[str, list[str]] = {}
    for u in dict.fromkeys(uris):
        groups.setdefault(filesystem_of(u), []).append(u)
    got: dict[str, bytes | Exception] = {}
    for group in groups.values():
        got.update(fetch(group, storage_options, attempts=attempts, cap=cap))
    return [got[u] for u in uris]


def filesystem_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri and not uri.startswith("file://") else "file"


def fetch(uris: list[str], storage_options: dict | None, *, attempts: int,
          cap: int | None = None) -> dict[str, bytes | Exception]:
    """One filesystem's objects by URI."""
    try:
        fs = storage.locate(uris[0], storage_options).fs  # once per batch and filesystem, not per image
    except Exception as e:  # a scheme no installed filesystem serves: every object of it is unreadable
        return dict.fromkeys(uris, e)
    path_of = {u: fs._strip_protocol(u) for u in uris}  # each filesystem's own path form
    got: dict[str, bytes | Exception] = {}
    wanted = list(path_of.values())
    for attempt in range(attempts):
        try:
            fetched = (fs.cat(wanted, on_error="return") if cap is None else
                       dict(zip(wanted, fs.cat_ranges(wanted, [0] * len(wanted), [cap + 1] * len(wanted),
                                                      on_error="return"))))
            got.update({p: fetched.get(p, FileNotFoundError(p)) for p in wanted})
        except Exception as e:  # the whole request failed: every object of it is unread
            got.update(dict.fromkeys(wanted, e))
        wanted = [p for p in wanted if isinstance(got[p], Exception) and retry.is_transient(got[p])]
        if not wanted or attempt == attempts - 1:
            break
        time.sleep(retry.backoff(attempt))
    over = f"more than extract.max_image_bytes={cap} bytes (its size was not listed: read up to the limit)"
    return {u: TooBig(over) if cap is not None and isinstance(got[p], bytes) and len(got[p]) > cap else got[p]
            for u, p in path_of.items()}


def blobs(batch: pa.Table, storage_options: dict | None, max_bytes: int | None) -> tuple[list, np.ndarray]:
    """Each row's bytes (or the error reading them), and which rows are already done."""
    n = batch.num_rows
    done = batch["done"].to_numpy(zero_copy_only=False) if "done" in batch.column_names else np.zeros(n, bool)
    if "data" in batch.column_names:  # WebDataset: the bytes came inline from the shard
        data = batch["data"].to_pylist()
        problems = batch["problem"].to_pylist() if "problem" in batch.column_names else [""] * n
        return [BadSample(p) if p else d for d, p in zip(data, problems)], done
    uris = batch["uri"].to_pylist()
    sizes = batch["size"].to_pylist() if "size" in batch.column_names else [None] * n
    # Over the cap by the listing's size: refused before a byte is read.
    over = {i: TooBig(f"{size} bytes exceeds extract.max_image_bytes={max_bytes}")
            for i, size in enumerate(sizes) if max_bytes and size is not None and size > max_bytes and not done[i]}
    todo = [i for i in range(n) if i not in over and not done[i]]
    data: list = [b""] * n
    for unsized in (False, True):  # an object of unknown size is read no further than the cap
        part = [i for i in todo if (sizes[i] is None) == unsized]
        cap = max_bytes if unsized else None
        for i, blob in zip(part, read_all([uris[i] for i in part], storage_options, cap=cap)):
            data[i] = blob
    for i, e in over.items():
        data[i] = e
    return data, done


def reason(e: BaseException) -> str:
    """One readable line for the quarantine's `error` column: no object's memory address, no token."""
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-f]+>", "", str(e))
    if type(e).__name__ == "UnidentifiedImageError":
        text = f"{text}: not an image format PIL reads (or a truncated one)"
    return mask_text(f"{type(e).__name__}: {text}")


class BadSample(ValueError):
    """A WebDataset sample without an image member, or with a label that is not text."""


class TooBig(ValueError):
    """An object over extract.max_image_bytes; known from the listing, never read."""


def each_row(batch: pa.Table, *, fill: Callable[[int, bytes], None], max_pixels: int,
             storage_options: dict | None, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the batch, call `fill(row, bytes)` on each row to do; returns `stage` and `error` per row."""
    imaging.set_pil_limit(max_pixels)  # a no-op after a worker's first batch
    n = batch.num_rows
    stage = np.full(n, schema.ERROR_NONE, dtype=object)
    error = np.full(n, schema.ERROR_NONE, dtype=object)
    data, done = blobs(batch, storage_options, max_bytes)
    for i, blob in enumerate(data):
        if done[i]:  # already in the output: carried only to be counted
            stage[i] = schema.STAGE_DONE
        elif isinstance(blob, Exception):
            # A passing failure is left for the next run; only a lasting one is quarantined.
            stage[i] = schema.STAGE_RETRY if retry.is_transient(blob) else READ
            error[i] = reason(blob)
        else:
            try:
                fill(i, blob)
            except Exception as e:  # any decoder failure quarantines this image only
                stage[i], error[i] = DECODE, reason(e)
    return stage, error


def decode_batch(batch: pa.Table, *, pre: imaging.Preprocess, max_pixels: int,
                 storage_options: dict | None, max_bytes: int | None = None) -> pa.Table:
    """A Ray Data batch of listed images → pixels, sizes, and per-row errors."""
    n = batch.num_rows
    pixels = np.zeros((n, pre.crop, pre.crop, 3), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)

    def fill(i: int, blob: bytes) -> None:
        pixels[i], width[i], height[i] = imaging.decode_one(blob, pre, max_pixels=max_pixels)

    stage, error = each_row(batch, fill=fill, max_pixels=max_pixels, storage_options=storage_options,
                            max_bytes=max_bytes)
    # Imported here: ray.data takes seconds to import, and only reader tasks need its tensor type.
    from ray.data.extensions import ArrowTensorArray

    columns = {"pixels": ArrowTensorArray.from_numpy(pixels)}
    return table(batch, columns=columns, width=width, height=height, stage=stage, error=error)


def read_batch(batch: pa.Table, *, pre: imaging.Preprocess, max_pixels: int,
               storage_options: dict | None, max_bytes: int | None = None) -> pa.Table:
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

    stage, error = each_row(batch, fill=fill, max_pixels=max_pixels, storage_options=storage_options,
                            max_bytes=max_bytes)
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
