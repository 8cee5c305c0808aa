"""Bad input: odd images decode to correct RGB, broken ones are quarantined, nothing is lost."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ftl import config
from ftl.cli import main
from ftl.errors import FtlError
from ftl.extract import stage as extract
from ftl.io import schema
from ftl.model import imaging
from ftl.pipeline import readers
from tests.conftest import write_workflow
from tests.support import tables
from tests.support.invariant import assert_exactly_once

PRE = imaging.Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def odd_images() -> dict[str, bytes]:
    """Decodable but unusual: each must come out as correct 8-bit RGB."""
    rotated = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    return {
        "gray.jpg": jpeg(Image.new("L", (30, 30), 77)),
        "cmyk.jpg": jpeg(Image.new("CMYK", (30, 30), (0, 255, 255, 0))),  # pure red in CMYK
        "deep16.png": png(Image.fromarray(np.full((30, 30), 0x8080, dtype=np.uint16))),
        "palette_alpha.png": png(palette, transparency=0),  # index 0 is fully transparent
        "exif_rotated.jpg": jpeg(rotated, exif=exif),
    }


def broken_images() -> dict[str, str]:
    """Undecodable, with the words the quarantine reason must contain."""
    return {"truncated.jpg": "runcated", "empty.jpg": "empty file", "notes.png": "cannot identify",
            "bomb.png": "max_image_pixels"}


def write_corpus(root) -> None:
    good = root / "good"
    good.mkdir(parents=True)
    for name, data in odd_images().items():
        (good / name).write_bytes(data)
    for i in range(6):
        (good / f"plain{i}.png").write_bytes(png(Image.new("RGB", (28, 28), (i * 40, 100, 50))))
    bad = root / "bad"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(jpeg(Image.effect_noise((64, 64), 50).convert("RGB"))[:600])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("this is a text file, not an image\n")
    # 12000 x 12000 = 144M pixels: over the default 89M-pixel limit, yet a small file.
    (bad / "bomb.png").write_bytes(png(Image.new("1", (12000, 12000), 0), optimize=True))


def test_odd_images_become_correct_rgb():
    images = odd_images()
    pixels = {n: imaging.decode_one(b, PRE, max_pixels=10**8) for n, b in images.items()}
    for name, (arr, _, _) in pixels.items():
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, name
    assert (pixels["gray.jpg"][0] == 77).all() or abs(int(pixels["gray.jpg"][0].mean()) - 77) <= 1
    r, g, b = pixels["cmyk.jpg"][0].reshape(-1, 3).mean(0)
    assert r > 200 and g < 40 and b < 40
    assert abs(int(pixels["deep16.png"][0].mean()) - 128) <= 1  # 16-bit 0x8080 scales to 8-bit 128
    assert (pixels["palette_alpha.png"][0] == 255).all()  # transparent composited on white
    assert pixels["exif_rotated.jpg"][1:] == (20, 40)  # width, height as displayed


def test_bomb_is_refused_before_decoding():
    with pytest.raises(imaging.TooLarge, match="exceeds extract.max_image_pixels=1000"):
        imaging.decode_one(png(Image.new("RGB", (50, 50))), PRE, max_pixels=1000)


def test_header_names_format_mode_orientation_and_displayed_size():
    rotated = odd_images()["exif_rotated.jpg"]
    header = imaging.open_image(rotated, max_pixels=10**8)[1]
    assert header == imaging.Header("JPEG", "RGB", (40, 20), 6)
    assert (header.width, header.height) == (20, 40)
    odd = Image.new("RGB", (40, 20))
    exif = odd.getexif()
    exif[0x0112] = 9  # not an orientation: read as upright, as exif_transpose does
    assert imaging.open_image(jpeg(odd, exif=exif), max_pixels=10**8)[1].orientation == 1
    with pytest.raises(imaging.BadImage, match="empty file"):
        imaging.open_image(b"", max_pixels=10**8)
    assert issubclass(imaging.TooLarge, FtlError)


@pytest.fixture
def pil_limit():
    """PIL's process-wide limit, put back after the test."""
    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


def test_pil_guard_stays_on_and_its_refusals_are_too_large(pil_limit):
    imaging.set_pil_limit(1000)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks out as a warning either
        # 1600 pixels: PIL itself would only warn, and decode; 2500: PIL raises.
        for side in (40, 50):
            with pytest.raises(imaging.TooLarge, match=r"^(1,600|2,500) pixels exceeds extract.max_image_pixels="):
                imaging.decode_one(png(Image.new("RGB", (side, side))), PRE, max_pixels=10**8)
        assert imaging.decode_one(png(Image.new("RGB", (30, 30))), PRE, max_pixels=10**8)[0].shape == (32, 32, 3)


@pytest.mark.parametrize("reader", [readers.decode_batch, readers.read_batch])
def test_both_readers_mark_rows_alike(tmp_path, pil_limit, reader):
    files = {"good.png": png(Image.new("RGB", (28, 24), (9, 90, 200))), "empty.jpg": b"", "done.png": b"",
             "big.png": png(Image.new("RGB", (50, 50))), "truncated.jpg": jpeg(Image.new("RGB", (64, 64)))[:300],
             "notes.png": b"not an image"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = [*files, "missing.png"]
    listed = pa.table({"image_id": names, "uri": [str(tmp_path / n) for n in names], "label": ["a"] * len(names),
                       "split": [None] * len(names), "done": [n == "done.png" for n in names]})
    out = reader(listed, pre=PRE, max_pixels=1000, storage_options=None)
    assert out.column_names[:4] == list(schema.PASSTHROUGH) and out.column_names[-2:] == ["stage", "error"]
    rows = dict(zip(names, zip(out["stage"].to_pylist(), out["error"].to_pylist())))
    assert rows["good.png"] == (schema.ERROR_NONE, schema.ERROR_NONE)
    assert rows["done.png"] == (schema.STAGE_DONE, schema.ERROR_NONE)
    assert rows["missing.png"][0] == "read" and "FileNotFoundError" in rows["missing.png"][1]
    assert rows["empty.jpg"][0] == "decode" and "empty file" in rows["empty.jpg"][1]
    assert rows["big.png"][0] == "decode" and rows["big.png"][1].startswith("TooLarge: ")
    assert "extract.max_image_pixels=1000" in rows["big.png"][1]
    assert rows["truncated.jpg"][0] == "decode"
    assert not any("object at 0x" in e or e.count("exceeds") > 1 for _, e in rows.values())  # one readable sentence
    assert (out["width"][0].as_py(), out["height"][0].as_py()) == (28, 24)
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's guard at ftl's limit, not switched off


def corpus_workflow(tmp_path, *, max_error_fraction: float, decode: str = "auto"):
    """The corpus on disk and a workflow over it (random weights, small crop: decoding is the point)."""
    write_corpus(tmp_path / "corpus")
    return write_workflow(tmp_path / "wf.yaml", source={"uri": str(tmp_path / "corpus")},
                          extract={"output": str(tmp_path / "out"), "weights": "random", "decode": decode,
                                   "preprocess": {"resize": 64, "crop": 64}, "max_error_fraction": max_error_fraction})


# "device" is the GPU path (JPEG bytes to the actor, torchvision.io there), here on the CPU.
@pytest.mark.parametrize("decode_on", ["cpu", "device"])
def test_bad_images_are_quarantined_and_counted(tmp_path, ray_runtime, capsys, decode_on):
    wf = corpus_workflow(tmp_path, max_error_fraction=0.5, decode=decode_on)
    assert main(["extract", str(wf)]) == 0
    out = capsys.readouterr().out
    assert "listed 15 = 0 already done + 11 extracted + 4 quarantined" in out
    assert f"decode by {'PIL in CPU tasks' if decode_on == 'cpu' else 'torchvision.io on cpu'}" in out

    feats = tables.frame(tmp_path / "out" / "features")
    quarantine = tables.frame(tmp_path / "out" / "quarantine")
    assert sorted(feats["uri"].str.split("/").str[-1]) == sorted([*odd_images(), *(f"plain{i}.png" for i in range(6))])
    assert set(feats["label"]) == {"good"} and set(quarantine["label"]) == {"bad"}
    reasons = dict(zip(quarantine["uri"].str.split("/").str[-1], quarantine["error"]))
    assert set(reasons) == set(broken_images())
    for name, words in broken_images().items():
        assert words in reasons[name], (name, reasons[name])
    assert set(quarantine["stage"]) == {"decode"}
    assert not set(feats["image_id"]) & set(quarantine["image_id"])
    rotated = feats[feats["uri"].str.endswith("exif_rotated.jpg")].iloc[0]
    assert (rotated["width"], rotated["height"]) == (20, 40)

    # A rerun retries nothing: quarantined images are accounted for as done.
    again = extract.run(config.load_workflow(wf))
    assert (again.already_done, again.ok, again.quarantined) == (15, 0, 0)
    assert assert_exactly_once(str(tmp_path / "out"), listed=corpus_uris(tmp_path), not_done=0) == {
        "features": 11, "quarantine": 4, "not_done": 0}


def test_max_error_fraction_fails_after_writing_quarantine(tmp_path, ray_runtime, capsys):
    wf = corpus_workflow(tmp_path, max_error_fraction=0.2)
    assert main(["extract", str(wf)]) == 2
    err = capsys.readouterr().err
    assert "4 of the 15 images this run tried failed (4 quarantined, 0 to retry), over extract.max_error_fraction=0.2" in err
    assert len(tables.frame(tmp_path / "out" / "quarantine")) == 4
    assert len(tables.frame(tmp_path / "out" / "features")) == 11
    assert_exactly_once(str(tmp_path / "out"), listed=corpus_uris(tmp_path), not_done=0)


def corpus_uris(tmp_path) -> list[str]:
    return [str(p) for p in (tmp_path / "corpus").rglob("*") if p.is_file()]
