"""A reader batch that mixes filesystems: each scheme's objects are read by their own filesystem."""

from __future__ import annotations

import functools
import http.server
import threading

import fsspec
import pyarrow as pa
import pytest

from ftl.model import imaging
from ftl.pipeline import readers


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server over a folder, on a free port, for as long as the test runs."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def shipped_pngs(fmnist, n: int) -> list[bytes]:
    """Real Fashion-MNIST PNGs from the session's imagefolder."""
    return [p.read_bytes() for p in sorted(fmnist.rglob("*.png"))[:n]]


def test_a_batch_of_http_local_and_memory_images_reads_every_one(tmp_path, http_folder, fmnist):
    served, base = http_folder
    blobs = shipped_pngs(fmnist, 4)
    (served / "a.png").write_bytes(blobs[0])
    local = tmp_path / "local"
    local.mkdir()
    (local / "b.png").write_bytes(blobs[1])
    memory = fsspec.filesystem("memory")
    memory.pipe("/readers-test/c.png", blobs[2])
    uris = [f"{base}/a.png", str(local / "b.png"), "memory://readers-test/c.png", f"file://{local}/b.png",
            f"{base}/missing.png", "nosuchscheme://x/d.png"]
    got = readers.read_all(uris, None, attempts=1)
    assert got[:4] == [blobs[0], blobs[1], blobs[2], blobs[1]]
    assert isinstance(got[4], Exception) and isinstance(got[5], Exception)  # only these two rows fail


def test_the_first_row_scheme_does_not_decide_the_batch(tmp_path, http_folder, fmnist):
    """An https/http row first in its batch once sent every s3:// row to quarantine; now each is read."""
    served, base = http_folder
    blobs = shipped_pngs(fmnist, 3)
    (served / "first.png").write_bytes(blobs[0])
    for i, b in enumerate(blobs[1:]):
        (tmp_path / f"{i}.png").write_bytes(b)
    batch = pa.table({"image_id": ["0", "1", "2"], "uri": [f"{base}/first.png", str(tmp_path / "0.png"),
                                                          str(tmp_path / "1.png")],
                      "label": ["x"] * 3, "split": [None] * 3})
    out = readers.decode_batch(batch, pre=imaging.Preprocess(32, 28, (0.5,) * 3, (0.5,) * 3),
                               max_pixels=10**7, storage_options=None)
    assert out["error"].to_pylist() == ["", "", ""]


def test_the_byte_cap_holds_when_the_listing_gave_no_size(tmp_path, http_folder, fmnist):
    """A manifest row whose size is unknown is read no further than extract.max_image_bytes."""
    served, base = http_folder
    small = shipped_pngs(fmnist, 1)[0]
    (served / "big.png").write_bytes(small + b"\0" * 200_000)
    (served / "small.png").write_bytes(small)
    batch = pa.table({"image_id": ["0", "1"], "uri": [f"{base}/big.png", f"{base}/small.png"],
                      "label": ["x"] * 2, "split": [None] * 2, "size": pa.nulls(2, pa.int64())})
    out = readers.decode_batch(batch, pre=imaging.Preprocess(32, 28, (0.5,) * 3, (0.5,) * 3), max_pixels=10**7,
                               storage_options=None, max_bytes=len(small) + 10)
    errors = out["error"].to_pylist()
    assert "more than extract.max_image_bytes" in errors[0] and errors[1] == ""
