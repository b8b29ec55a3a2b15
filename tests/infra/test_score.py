"""Scoring summaries: per-domain figures (AUC, LogLoss, NE, calibration) and the printed table."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from mdlora.infra.score import Scorer
from mdlora.infra.score_output import Scores


def test_labelled_summary_carries_ne_and_calibration_per_domain():
    # the summary step of score_dataset alone, on the attributes it reads of a loaded Scorer
    scorer = SimpleNamespace(info=SimpleNamespace(version="v0001"), versions={"a": "v0002"},
                             backbone_of={"a": "v0001"}, schema=SimpleNamespace(label="click"))
    preds = Scores.of_batches([(pa.array(["a", "a", "b", "b"]), np.array([0.8, 0.4, 0.3, 0.1], np.float32),
                                pa.array([1, 0, 0, 0], pa.int8()))])
    assert preds.label.dtype == np.uint8 and preds.codes.tolist() == [0, 0, 1, 1]
    s = Scorer._summary(scorer, preds, True, "out.parquet")
    a, b = s["domains"]["a"], s["domains"]["b"]
    assert a["ne"] == pytest.approx(-np.log2(0.8 * 0.6) / 2)  # base rate 1/2: mean bits per row
    assert a["calibration"] == pytest.approx(1.2) and s["calibration"] == pytest.approx(1.6)
    assert b["ne"] is None and b["calibration"] is None and b["auc"] is None  # no clicks
    assert b["logloss"] == pytest.approx(-np.mean(np.log([0.7, 0.9])))
    assert s["ne"] is not None and s["wauc"] == a["auc"] == 1.0 and s["fallback_rows"] == 2
    assert s["table"].splitlines()[0].split()[-2:] == ["ne", "calibration"]
    unlabelled = Scorer._summary(scorer, Scores(preds.names, preds.codes, preds.prob), False, "out.parquet")
    assert "ne" not in unlabelled and "ne" not in unlabelled["domains"]["a"]


def test_score_workers_are_config_keys_of_score_and_the_gate():
    from mdlora.trainer.config import ScoreConfig, load_adapt_config, load_retrain_config

    assert load_adapt_config(None, ["score.workers=4"]).score == ScoreConfig(workers=4)
    gate = ["gate.holdout=h", "gate.score.workers=0", "gate.score.cpus_per_worker=2"]
    assert load_retrain_config(None, gate).gate.score == ScoreConfig(workers=0, cpus_per_worker=2)
    with pytest.raises(ValueError, match="adapt.score"):
        load_retrain_config(None, ["gate.holdout=h", "adapt.score.workers=2"])
    with pytest.raises(ValueError, match="workers"):
        ScoreConfig(workers=-1)
