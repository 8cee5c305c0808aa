"""Which candidate replaces the probe: paired gains on the same val images against a margin of standard errors."""

from __future__ import annotations

import numpy as np
import pytest

from ftl.finetune import selection

N = 500


def probe_and(gains: int, losses: int, *, base: int = 400, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The probe right on `base` of N val images; a candidate that fixes `gains` of its errors, breaks `losses`."""
    rng = np.random.default_rng(seed)
    probe = np.zeros(N, dtype=np.int8)
    probe[rng.permutation(N)[:base]] = 1
    correct = probe.copy()
    correct[rng.choice(np.flatnonzero(probe == 0), gains, replace=False)] = 1
    correct[rng.choice(np.flatnonzero(probe == 1), losses, replace=False)] = 0
    return probe, {"val_correct": correct.tolist(), "val_accuracy": correct.mean(), "val_loss": 1 - correct.mean()}


def test_a_candidate_that_wins_on_val_by_less_than_the_margin_is_not_chosen():
    probe, small = probe_and(6, 2)  # +0.8 points: about 1.4 paired SE
    gain, se = selection.paired(np.array(small["val_correct"]), probe)
    assert gain == pytest.approx(4 / N) and 1 < gain / se < 2
    choice = selection.select(probe, [small], margin=2.0)
    assert choice.kept_probe and choice.index == 0 and not choice.rows[0]["wins"]
    assert selection.select(probe, [small], margin=1.0).kept_probe is False  # the margin, not the gain, decided


def test_a_candidate_that_wins_by_the_margin_replaces_the_probe_and_reports_its_errors():
    probe, large = probe_and(20, 2)  # +3.6 points with few losses: about 3.9 paired SE
    choice = selection.select(probe, [large], margin=2.0)
    r = choice.rows[0]
    assert not choice.kept_probe and r["wins"] and r["gain"] / r["gain_se"] > 3
    acc = large["val_accuracy"]
    assert r["val_se"] == pytest.approx(np.sqrt(acc * (1 - acc) / N))


def test_a_noisy_better_candidate_loses_to_a_clear_winner():
    probe, noisy = probe_and(40, 25, seed=1)  # +3.0 points but 65 disagreements: under 2 SE
    _, clear = probe_and(14, 0, seed=1)  # +2.8 points, no image broken: far over 2 SE
    assert noisy["val_accuracy"] > clear["val_accuracy"]
    choice = selection.select(probe, [noisy, clear], margin=2.0)
    assert not choice.kept_probe and choice.index == 1, choice.rows
    # The loop keeps states by the same order: a winner first, then the best on val.
    assert selection.key(probe, clear, margin=2.0) > selection.key(probe, noisy, margin=2.0)


def test_the_probe_unchanged_never_wins_even_at_margin_zero():
    probe, same = probe_and(0, 0)
    assert selection.select(probe, [same], margin=0.0).kept_probe


def test_a_candidate_from_a_checkpoint_without_per_image_results_never_wins():
    """Resuming a run checkpointed before val_correct was kept: that candidate is ranked, never chosen over the
    probe."""
    probe, large = probe_and(20, 2)
    legacy = {k: v for k, v in large.items() if k != "val_correct"}
    assert not selection.wins(probe, legacy, margin=2.0)
    choice = selection.select(probe, [legacy], margin=2.0)
    assert choice.kept_probe and np.isnan(choice.rows[0]["gain"])
    assert selection.select(probe, [legacy, large], margin=2.0).index == 1


def test_each_candidates_test_gain_is_paired_with_the_probe_on_the_same_images():
    probe_val, cand = probe_and(20, 2)
    probe_test, on_test = probe_and(9, 3, seed=2)
    cand["test_correct"] = on_test["val_correct"]
    [row] = selection.on_test(selection.select(probe_val, [cand], margin=2.0).rows, [cand], probe_test)
    assert row["test_gain"] == pytest.approx(6 / N) and row["test_accuracy"] == pytest.approx(406 / N)
    assert row["probe_test_accuracy"] == pytest.approx(400 / N)
    assert row["test_gain_se"] == pytest.approx(selection.paired(np.array(on_test["val_correct"]), probe_test)[1])
    assert "test_gain" not in selection.on_test([{}], [{"val_accuracy": 0.5}], probe_test)[0]  # none recorded
