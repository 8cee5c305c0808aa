"""The exactly-once invariant, checked by every test that writes features.

Every listed image is in exactly one of the features and quarantine tables (read through their
Delta logs), or not done (to be tried by the next run); `image_id`s are unique, and `count(*) = count(distinct image_id)` holds in DuckDB.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from ftl.io import storage, table


def read_folder(loc: storage.Location, columns=("image_id", "uri")) -> pa.Table:
    """The committed rows of one of the output's tables, through its log (what any engine sees)."""
    t = table.Table.at(loc)
    if not t.exists():
        stray = [p for p in (loc.fs.ls(loc.path, detail=False) if loc.fs.exists(loc.path) else [])
                 if p.endswith(".parquet")]
        assert not stray, f"{loc.uri}: Parquet files but no table log"
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return t.dataset().to_table(columns=list(columns))


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
