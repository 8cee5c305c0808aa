"""Split sanity, said before any fitting: what about the splits would make the metrics mislead.

A subset cut by URI order can hold all of test and half of the classes in train; val accuracy
then looks fine and test accuracy halves, with nothing said. These checks name such splits:
warnings go to the command's summary and to the run's `ftl.warnings` tag; val or test sharing
no class at all with train is an error, since every one of its rows would count as wrong.
"""

from __future__ import annotations

import numpy as np

from ftl.errors import FeatureError
from ftl.fitting.features import FeatureData

MIN_TRAIN_ROWS = 5  # a class with fewer train rows than this is barely fitted, and its metrics are noise
NAMES_SHOWN = 10  # class names listed in one message
TAG_CHARS = 5000  # of the warnings kept in the MLflow tag (MLflow caps tag values at 8,000)


def names_of(classes: list[str], idx: np.ndarray, counts: np.ndarray | None = None) -> str:
    """Up to NAMES_SHOWN class names (with counts when given), then how many more."""
    shown = [classes[i] + (f" ({counts[i]})" if counts is not None else "") for i in idx[:NAMES_SHOWN]]
    more = f" and {len(idx) - NAMES_SHOWN} more" if len(idx) > NAMES_SHOWN else ""
    return ", ".join(shown) + more


def check(data: FeatureData, *, val_fraction: float, test_fraction: float) -> list[str]:
    """Warnings about the splits of `data`; FeatureError when val or test shares no class with train."""
    classes = data.classes
    train = np.bincount(data.y["train"], minlength=len(classes))
    out = []
    for split in ("val", "test"):
        rows = np.bincount(data.y[split], minlength=len(classes))
        present = np.flatnonzero(rows)
        if not (train[present] > 0).any():
            raise FeatureError(
                f"no class in {split} appears in train: {split} holds {len(present)} class(es) "
                f"({names_of(classes, present)}), train holds {np.count_nonzero(train)} "
                f"({names_of(classes, np.flatnonzero(train))}); every {split} row would count as wrong. "
                f"Check how the splits were made: source.limit keeps the first images by URI and can cut whole "
                f"classes; train on the full source, or drop the split column and let ftl derive a stratified "
                f"split (train.val_fraction, train.test_fraction)"
            )
        unseen = present[train[present] == 0]
        if len(unseen):
            share = rows[unseen].sum() / rows.sum()
            out.append(f"{len(unseen)} of {len(present)} classes in {split} have no train rows: "
                       f"{names_of(classes, unseen)}; they cannot be predicted, so {rows[unseen].sum()} {split} rows "
                       f"({share:.0%}) count as wrong whatever the head (check source.limit and the split column)")
    out += derived(data, val_fraction=val_fraction, test_fraction=test_fraction)
    few = np.flatnonzero((train > 0) & (train < MIN_TRAIN_ROWS))
    if len(few):
        out.append(f"{len(few)} of {len(classes)} classes have fewer than {MIN_TRAIN_ROWS} train rows: "
                   f"{names_of(classes, few, train)}; their per-class metrics are noise")
    return out


def derived(data: FeatureData, *, val_fraction: float, test_fraction: float) -> list[str]:
    """What the hash rule placed because the split column did not say."""
    fraction = {"val": f"train.val_fraction={val_fraction:g}", "test": f"train.test_fraction={test_fraction:g}"}
    if data.split_source == "hash":
        return [(f"the features have no split: train/val/test were derived by a stratified hash of image_id "
                 f"({fraction['val']}, {fraction['test']}); give the images a split to choose them")]
    out = [f"the split column has no {s} rows: {s} was carved from train by a stratified hash ({fraction[s]})"
           for s in data.carved]
    if data.unsplit:
        out.append(f"{data.unsplit} rows have no train/val/test split value: placed by a stratified hash "
                   f"({fraction['val']}, {fraction['test']})")
    return out


def tag(warnings: list[str]) -> dict[str, str]:
    """The `ftl.warnings` tag for a run: one warning per line, cut to fit MLflow; none when all is well."""
    if not warnings:
        return {}
    text = "\n".join(warnings)
    return {"ftl.warnings": text if len(text) <= TAG_CHARS else text[: TAG_CHARS - 1] + "…"}


def lines(warnings: list[str]) -> list[str]:
    """The warnings as summary lines."""
    return [f"warning: {w}" for w in warnings]
