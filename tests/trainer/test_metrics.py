"""Per-domain metrics: hand-made AUC values, WAUC weighting, NE and calibration against TorchRec,
single-class domains, exact gather."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from mdlora.trainer.metrics import DomainMetrics, format_table
from tests.conftest import free_port

T = torch.tensor


def test_known_auc_and_logloss_per_domain():
    m = DomainMetrics(["a", "b"])
    # domain a: positives 0.9, 0.4 vs negatives 0.1, 0.5 -> 3 of 4 pairs ordered: AUC 0.75
    # domain b: perfectly ordered: AUC 1.0
    m.update(T([0.9, 0.4, 0.1, 0.5]), T([1.0, 1, 0, 0]), T([0, 0, 0, 0]))
    m.update(T([0.8, 0.2, 0.3]), T([1.0, 0, 0]), T([1, 1, 1]))
    r = m.compute()
    a, b = r["domains"]["a"], r["domains"]["b"]
    assert a["auc"] == 0.75 and b["auc"] == 1.0
    assert (a["n"], b["n"], r["n"]) == (4, 3, 7)
    assert a["pos_rate"] == 0.5 and b["pos_rate"] == pytest.approx(1 / 3)
    assert a["logloss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.9, 0.5])))
    assert r["wauc"] == pytest.approx((4 * 0.75 + 3 * 1.0) / 7)
    probs, labels = [0.9, 0.4, 0.1, 0.5, 0.8, 0.2, 0.3], [1, 1, 0, 0, 1, 0, 0]
    assert r["auc"] == roc_auc_score(labels, probs)
    assert r["logloss"] == pytest.approx(log_loss(labels, probs))


def test_wauc_weights_by_rows_and_skips_single_class_domains():
    m = DomainMetrics(["big", "small", "only_pos", "empty"])
    # big: 10 rows, AUC 0.5 (every score equal); small: 2 rows, AUC 1.0; only_pos: single class
    m.update(torch.full((10,), 0.3), T([1.0, 0] * 5), torch.zeros(10, dtype=torch.long))
    m.update(T([0.9, 0.1]), T([1.0, 0]), T([1, 1]))
    m.update(T([0.7, 0.6, 0.2]), T([1.0, 1, 1]), T([2, 2, 2]))
    r = m.compute()
    assert r["domains"]["big"]["auc"] == 0.5 and r["domains"]["small"]["auc"] == 1.0
    assert r["domains"]["only_pos"]["auc"] is None and r["domains"]["only_pos"]["n"] == 3
    assert r["domains"]["only_pos"]["logloss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.2])))
    only_pos = r["domains"]["only_pos"]
    assert only_pos["ne"] is None and only_pos["calibration"] == pytest.approx(1.5 / 3)
    assert r["domains"]["big"]["calibration"] == pytest.approx(3.0 / 5)
    assert r["domains"]["empty"] == {
        "auc": None,
        "logloss": None,
        "ne": None,
        "calibration": None,
        "n": 0,
        "pos_rate": None,
    }
    assert r["wauc"] == pytest.approx((10 * 0.5 + 2 * 1.0) / 12)
    assert r["n"] == 15


def test_undefined_figures_and_extreme_probabilities():
    m = DomainMetrics(["a"])
    assert m.compute()["wauc"] is None and m.compute()["n"] == 0
    m.update(T([0.0, 1.0]), T([1.0, 1.0]), T([0, 0]))  # wrong and certain: clipped, finite
    r = m.compute()
    assert r["auc"] is None and r["wauc"] is None and np.isfinite(r["logloss"])
    assert r["ne"] is None and r["calibration"] == 0.5  # one class: no entropy; (0 + 1) / 2
    assert "WAUC -" in format_table(r)
    negatives = DomainMetrics(["a"])
    negatives.update(T([0.2, 0.4]), T([0.0, 0.0]), T([0, 0]))
    assert negatives.compute()["ne"] is None and negatives.compute()["calibration"] is None


def _torchrec(metric_cls: type, probs: list, labels: list) -> float:
    """TorchRec's own lifetime metric of one task on these rows, unit weights, no process group."""
    from torchrec.metrics.metrics_config import RecTaskInfo

    task = RecTaskInfo(name="t", label_name="y", prediction_name="p", weight_name="w")
    metric = metric_cls(world_size=1, my_rank=0, batch_size=len(probs), tasks=[task])
    p, y = torch.tensor(probs, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)
    metric.update(predictions={"t": p}, labels={"t": y}, weights={"t": torch.ones_like(p)})
    (value,) = [v for k, v in metric.compute().items() if "lifetime" in k]
    return float(value)


def _ne(probs: list, labels: list) -> float:
    """TorchRec's NE formula, written out: log2 cross entropy sum / entropy of the base rate."""
    p, y = np.clip(np.array(probs), 1e-12, 1 - 1e-12), np.array(labels, dtype=float)
    q = y.mean()
    return np.sum(-y * np.log2(p) - (1 - y) * np.log2(1 - p)) / -(
        y.sum() * np.log2(q) + (1 - y).sum() * np.log2(1 - q)
    )


def test_ne_and_calibration_match_torchrec():
    from torchrec.metrics.calibration import CalibrationMetric
    from torchrec.metrics.ne import NEMetric

    pa, ya = [0.9, 0.2, 0.6, 0.4], [1.0, 0, 0, 1]  # base rate 1/2: 1 bit of entropy per row
    pb, yb = [0.7, 0.1, 0.2, 0.3], [1.0, 0, 0, 0]  # base rate 1/4
    m = DomainMetrics(["a", "b"])
    m.update(T(pa + pb, dtype=torch.float64), T(ya + yb), T([0] * 4 + [1] * 4))  # 0.9 exactly
    r = m.compute()
    a, b = r["domains"]["a"], r["domains"]["b"]
    # by hand: a's NE is its mean cross entropy in bits, -(log2 .9 + log2 .8 + 2 log2 .4) / 4
    assert a["ne"] == pytest.approx(-np.log2(0.9 * 0.8 * 0.4 * 0.4) / 4, rel=1e-12)
    assert a["ne"] == pytest.approx(a["logloss"] / np.log(2), rel=1e-9)
    assert a["calibration"] == pytest.approx(2.1 / 2) and b["calibration"] == pytest.approx(1.3 / 1)
    assert b["ne"] == pytest.approx(-np.log2(0.7 * 0.9 * 0.8 * 0.7) / -np.log2(0.25 * 0.75**3))
    assert r["calibration"] == pytest.approx(3.4 / 3)
    for got, probs, labels in ((a, pa, ya), (b, pb, yb), (r, pa + pb, ya + yb)):
        assert got["ne"] == pytest.approx(_ne(probs, labels), rel=1e-12)
        assert got["ne"] == pytest.approx(_torchrec(NEMetric, probs, labels), rel=1e-12)
        assert got["calibration"] == pytest.approx(
            _torchrec(CalibrationMetric, probs, labels), rel=1e-12
        )
    assert r["ne"] not in (a["ne"], b["ne"])  # over all rows: the pooled base rate 3/8


def test_ne_clips_like_torchrec_not_like_logloss():
    from torchrec.metrics.ne import NEMetric

    probs, labels = [0.0, 1.0, 0.5, 0.5], [1.0, 0, 1, 0]  # certain and wrong twice
    m = DomainMetrics(["a"])
    m.update(T(probs), T(labels), T([0] * 4))
    r = m.compute()
    # eta 1e-12: each certain miss costs about 40 bits, not log2(1e7) = 23 as in logloss
    assert r["ne"] == pytest.approx(_torchrec(NEMetric, probs, labels), rel=1e-9)
    assert r["ne"] == pytest.approx((2 * -np.log2(1e-12) + 2) / 4, rel=1e-4)
    assert r["ne"] > 1.5 * r["logloss"] / np.log(2)


def test_bad_domain_id_and_shapes_are_rejected():
    m = DomainMetrics(["a", "b"])
    with pytest.raises(ValueError, match=r"id 2 outside \[0, 2\)"):
        m.update(T([0.5]), T([1.0]), T([2]))
    with pytest.raises(ValueError, match="differ"):
        m.update(T([0.5, 0.5]), T([1.0]), T([0]))
    assert m.compute()["n"] == 0


def test_format_table_lists_every_domain():
    m = DomainMetrics(["a", "b"])
    m.update(T([0.9, 0.1, 0.6]), T([1.0, 0, 1]), T([0, 0, 1]))
    lines = format_table(m.compute()).splitlines()
    assert lines[0].split() == ["domain", "n", "pos_rate", "auc", "logloss", "ne", "calibration"]
    assert lines[1].split()[:4] == ["a", "2", "0.5000", "1.0000"]
    ne_a = -np.log2(0.9 * 0.9) / 2  # base rate 1/2
    assert lines[1].split()[5:] == [f"{ne_a:.4f}", "1.0000"]  # calibration (0.9 + 0.1) / 1
    assert lines[2].split()[:4] == ["b", "1", "1.0000", "-"] and lines[2].split()[5:] == [
        "-",
        "0.6000",
    ]
    assert lines[3].split()[:2] == ["ALL", "3"] and lines[4] == "WAUC 1.0000"


def _rank_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uneven shards (rank 0: 300 rows, rank 1: 171), three domains, ties included."""
    gen = torch.Generator().manual_seed(100 + rank)
    n = 300 if rank == 0 else 171
    probs = torch.rand(n, generator=gen).round(decimals=2)
    return (
        probs,
        (torch.rand(n, generator=gen) < probs).float(),
        torch.randint(0, 3, (n,), generator=gen),
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = DomainMetrics(["a", "b", "c"])
        probs, labels, domains = _rank_rows(rank)
        for i in range(0, len(probs), 64):  # several updates per rank
            m.update(probs[i : i + 64], labels[i : i + 64], domains[i : i + 64])
        result = {"gathered": m.compute(), "local": m.compute(gather=False)}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_two_rank_gather_equals_single_process_on_union(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = DomainMetrics(["a", "b", "c"])
    for r in range(2):
        single.update(*_rank_rows(r))
    expected = json.loads(json.dumps(single.compute()))
    assert results[0]["gathered"] == results[1]["gathered"] == expected  # exact, on every rank
    assert expected["n"] == 471
    assert results[0]["local"]["n"] == 300 and results[0]["local"] != expected
