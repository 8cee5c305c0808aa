"""The exactly-once invariant, checked by every test that writes features.

Every listed image is in exactly one of: features, quarantine, or not done (to be tried by the
next run); `image_id`s are unique, and `count(*) = count(distinct image_id)` holds in DuckDB.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ftl.io import storage


def read_folder(loc: storage.Location, columns=("image_id", "uri")) -> pa.Table:
    parts = storage.list_parquet(loc)
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pq.ParquetDataset(parts, filesystem=loc.fs).read(columns=list(columns))


def assert_exactly_once(output: str, *, listed=None, not_done: int | None = None,
                        storage_options: dict | None = None, folder: str = "features") -> dict[str, int]:
    """Check the invariant on an output; `listed`: the listed URIs (any iterable), when the test knows them."""
    out = storage.locate(output, storage_options)
    features = read_folder(out.join(folder))  # noqa: F841 (DuckDB reads the local by its name)
    quarantine = read_folder(out.join("quarantine"))  # noqa: F841
    for name in ("features", "quarantine"):
        total, distinct = duckdb.sql(f"select count(*), count(distinct image_id) from {name}").fetchall()[0]
        assert total == distinct, f"{output}/{name}: {total - distinct} duplicate image_id rows"
        total, distinct = duckdb.sql(f"select count(*), count(distinct uri) from {name}").fetchall()[0]
        assert total == distinct, f"{output}/{name}: {total - distinct} uris with more than one row"
    both = duckdb.sql("select count(*) from features join quarantine using (image_id)").fetchall()[0][0]
    assert both == 0, f"{output}: {both} images are both in {folder} and in quarantine"
    counts = {"features": features.num_rows, "quarantine": quarantine.num_rows}
    if listed is not None:
        listed = set(listed)
        landed = set(features["uri"].to_pylist()) | set(quarantine["uri"].to_pylist())
        stray = landed - listed
        assert not stray, f"{output}: {len(stray)} rows of images that were not listed, e.g. {sorted(stray)[:3]}"
        counts["not_done"] = len(listed - landed)
        if not_done is not None:
            assert counts["not_done"] == not_done, f"{output}: {counts['not_done']} not done, expected {not_done}"
    return counts
