"""The quality harness end to end on a tiny synthetic log: two methods, one seed, all outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks import quality
from mdlora.infra.synth import generate


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    logs = root / "logs"
    generate(str(logs), rows=8000, domains=3, seed=0, users=300, items=300, days=1)
    argv = ["--dataset", "synthetic", "--path", str(logs), "--seeds", "1", "--methods", "mix,mlora",
            "--lrs", "0.01", "--batches", "256", "--adapter-lrs", "0.01", "--epochs", "3",
            "--adapter-epochs", "3", "--patience", "1", "--adapter-patience", "2", "--adapter-eval-every", "5", "--hidden", "16,8", "--ranks", "2,2",
            "--out", str(root / "out"), "--predictions"]
    return quality.main(argv), root / "out", argv


def test_outputs_exist_and_record_the_command(result):
    res, out, argv = result
    for suffix in ("json", "md", "png"):
        assert (out / f"quality_synthetic.{suffix}").stat().st_size > 0
    assert (out / "quality_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "quality_synthetic.json").read_text())
    assert saved["command"] == "python -m benchmarks.quality " + " ".join(argv)
    assert saved["methods"] == ["mix", "mlora"] and saved["seeds"] == [0]
    md = (out / "quality_synthetic.md").read_text()
    assert saved["command"] in md and "| mlora |" in md and "| mix |" in md


def test_figures_are_real_aucs_of_the_saved_predictions(result):
    res, out, _ = result
    pred = np.load(out / "quality_synthetic_predictions.npz")
    labels, domains = pred["labels"], pred["domains"]
    assert len(labels) == sum(res["rows"]["test"].values())
    for m in ("mix", "mlora"):
        run = res["per_seed"][m][0]
        assert 0.5 < run["auc"] < 1.0 and 0.0 < run["logloss"]
        assert run["auc"] == pytest.approx(roc_auc_score(labels, pred[m]), abs=1e-12)
        scored = 0
        for k, d in enumerate(res["rows"]["test"]):
            rows = domains == k
            if 0 < labels[rows].sum() < rows.sum():  # AUC defined
                assert run["domains"][d]["auc"] == pytest.approx(roc_auc_score(labels[rows], pred[m][rows]))
                scored += 1
            else:
                assert run["domains"][d]["auc"] is None
        assert scored >= 2
        assert res["summary"][m]["auc"] == {"mean": run["auc"], "std": 0.0, "n": 1}
    assert not np.array_equal(pred["mix"], pred["mlora"])  # the adapter changed the scores


def test_structure_params_and_hyper(result):
    res, _, _ = result
    domains = list(res["rows"]["test"])
    assert domains == ["d00", "d01", "d02"]
    for m in ("mix", "mlora"):
        assert set(res["summary"][m]["domains"]) == set(domains)
    assert res["hyper"]["mix"] == {"lr": 0.01, "batch": 256, "epochs": 3, "patience": 1, "eval_every": 0,
                                  "confidence": 0.9}
    assert res["hyper"]["mlora"] == {"lr": [0.01], "batch": 256, "epochs": 3, "patience": 2, "eval_every": 5,
                                    "confidence": 0.9}
    # MLoRA trains small adapters only; serving needs the frozen Mix model plus them
    e = res["params"]["mix"]["total"]
    assert res["params"]["mix"]["trainable"] == e
    assert 0 < res["params"]["mlora"]["trainable"] < e
    assert res["params"]["mlora"]["total"] == e + res["params"]["mlora"]["trainable"]
    assert "beats_mix" in res["summary"]["mlora"] and "beats_mix" not in res["summary"]["mix"]
    assert [t["method"] for t in res["selection"]["trials"]] == ["mix", "mlora"]

