"""`source.limit` takes a representative sample; a manifest listing an image twice lists it once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ftl.config import SourceConfig
from ftl.sources import listing, sample


def test_limit_keeps_every_split_and_class_in_proportion(fmnist):
    full = listing.list_images(SourceConfig(uri=str(fmnist)))
    picked = listing.list_images(SourceConfig(uri=str(fmnist), limit=90))
    assert picked.num_rows == 90
    assert set(picked["uri"].to_pylist()) <= set(full["uri"].to_pylist())
    assert picked["uri"].to_pylist() == sorted(picked["uri"].to_pylist())
    groups = Counter(zip(picked["split"].to_pylist(), picked["label"].to_pylist()))
    sizes = Counter(zip(full["split"].to_pylist(), full["label"].to_pylist()))
    assert set(groups) == set(sizes)  # every split × class is in the trial run
    for key, n in sizes.items():
        assert abs(groups[key] - 90 * n / full.num_rows) < 1, (key, groups[key])
    # Deterministic: the same listing gives the same sample.
    assert listing.list_images(SourceConfig(uri=str(fmnist), limit=90)).equals(picked)


def test_quotas_sum_to_the_limit_and_never_exceed_a_group():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=rng.integers(1, 30))
        limit = int(rng.integers(1, max(2, sizes.sum() + 5)))
        share = sample.quotas(sizes, limit)
        assert share.sum() == min(limit, sizes.sum()) and (share <= sizes).all() and (share >= 0).all()
        if limit >= len(sizes):
            assert ((share > 0) | (sizes == 0)).all()  # a group is never left out while the limit allows


def test_a_manifest_listing_an_image_twice_lists_it_once(fmnist, tmp_path):
    uris = sorted(str(p) for p in (fmnist / "test" / "bag").iterdir())[:4]
    rows = uris + [uris[1], uris[3], uris[1]]
    path = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": rows, "label": ["bag"] * len(rows)}), path)
    table = listing.list_images(SourceConfig(uri=str(path), format="manifest"))
    assert table["uri"].to_pylist() == uris
    assert sample.unique_uris(pa.table({"uri": rows}))[1] == 3
