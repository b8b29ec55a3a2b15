"""The paired bootstrap of benchmarks.pipeline_quality(_stats) on scores whose answer is known (no pipeline run)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks.pipeline_quality_stats import classify, gate_of, paired_bootstrap


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.3).astype(np.int8)
    weak = 0.3 * y + rng.normal(size=len(y))  # AUC ~0.58
    strong = 1.0 * y + rng.normal(size=len(y))  # AUC ~0.76, on the same rows
    return y, weak, strong


def test_clearly_better_is_above(rows):
    y, weak, strong = rows
    r = paired_bootstrap(y, weak, strong, resamples=300, seed=1)
    assert r["class"] == "above" and r["p"] < 0.05
    assert r["auc_backbone"] == roc_auc_score(y, weak) and r["auc_adapter"] == roc_auc_score(
        y, strong
    )
    assert r["gain"] == pytest.approx(r["auc_adapter"] - r["auc_backbone"])
    assert 0 < r["ci"][0] < r["gain_mean"] < r["ci"][1]
    assert r["gain_mean"] == pytest.approx(r["gain"], abs=0.01)  # the bootstrap centres on the gain
    assert (r["rows"], r["positives"]) == (len(y), int(y.sum()))


def test_clearly_worse_is_below(rows):
    y, weak, strong = rows
    r = paired_bootstrap(y, strong, weak, resamples=300, seed=1)
    assert r["class"] == "below" and r["p"] > 0.95 and r["ci"][1] < 0


def test_identical_scores_are_equal(rows):
    y, weak, _ = rows
    r = paired_bootstrap(y, weak, weak.copy(), resamples=300, seed=1)
    assert r["class"] == "equal" and r["p"] == 0.5  # every resample ties: each counts half
    assert r["gain"] == 0 and r["ci"] == [0.0, 0.0]


def test_same_seed_same_answer_and_one_class_is_na(rows):
    y, weak, strong = rows
    assert paired_bootstrap(y, weak, strong, resamples=50, seed=3) == paired_bootstrap(
        y, weak, strong, resamples=50, seed=3
    )
    r = paired_bootstrap(np.ones(10, np.int8), weak[:10], strong[:10], resamples=50)
    assert r["class"] == "n/a" and r["p"] is None and r["rows"] == 10


def test_classify_thresholds():
    assert [classify(p) for p in (0.0, 0.049, 0.05, 0.5, 0.95, 0.951, 1.0, None)] == [
        "above",
        "above",
        "equal",
        "equal",
        "equal",
        "below",
        "below",
        "n/a",
    ]


def test_gate_decision_from_the_manifest():
    kept = {"metrics": {"train": {"best_epoch": 2.0, "gain_confidence": 0.97}}}
    reset = {"metrics": {"train": {"best_epoch": 0.0, "gain_confidence": 0.6}}}
    nothing = {"metrics": {"train": {"best_epoch": 0.0}}}
    assert [gate_of(m, 0.9)["decision"] for m in (kept, reset, nothing)] == [
        "adapter",
        "backbone (gate)",
        "backbone (no gain)",
    ]
    assert gate_of(kept, 0.9)["confidence"] == 0.97
