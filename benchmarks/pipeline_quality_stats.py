"""The paired comparison of one cell of :mod:`benchmarks.pipeline_quality`: backbone vs adapters.

Both scorings cover the same test rows in the same order. Per domain: AUC and LogLoss of each,
a paired, label-stratified bootstrap of the AUC gain (:func:`paired_bootstrap`) and the class
above / equal / below it gives (:func:`classify`), beside what the adapt gate decided for the
domain's bundle (:func:`gate_of`).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

SIGNIFICANCE = 0.05
"""One-sided level: above when p < it, below when p > 1 - it."""


def classify(p: float | None, significance: float = SIGNIFICANCE) -> str:
    """``above`` (p < significance), ``below`` (p > 1 - significance), ``equal``; ``n/a`` for None."""
    if p is None:
        return "n/a"
    return "above" if p < significance else "below" if p > 1 - significance else "equal"


def paired_bootstrap(
    labels: np.ndarray,
    base: np.ndarray,
    adapted: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired, label-stratified bootstrap of the AUC gain ``adapted - base`` on the same N rows.

    Each resample draws the positives and the negatives separately with replacement (class
    counts fixed, as pROC and the adapt gate do) and scores both models on the same drawn rows.
    With fixed counts AUC = U / (n_pos n_neg), U being scipy's Mann-Whitney statistic of the
    positives' scores against the negatives' (ties count half, as in AUC), so a block of
    resamples costs one vectorised call per model.

    Args:
        labels: [N] 0/1 labels.
        base: [N] backbone scores.
        adapted: [N] adapter scores of the same rows.
        resamples: bootstrap resamples R.
        seed: resampling seed.
        level: two-sided level of the percentile interval.

    Returns:
        ``{"rows", "positives", "auc_backbone", "auc_adapter", "gain", "gain_mean", "ci", "p",
        "class", "resamples"}``: ``gain`` on all N rows (sklearn AUCs), ``gain_mean`` and ``ci``
        ([lo, hi]) over the resamples, ``p`` = share of resamples whose gain is < 0 (a zero gain
        counts half: identical models give 0.5), ``class`` by :func:`classify`. The AUC figures
        are None (class ``n/a``) when the rows hold one class.
    """
    y = np.asarray(labels)
    b, a = np.asarray(base, np.float64), np.asarray(adapted, np.float64)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    out = {"rows": int(len(y)), "positives": int(len(pos)), "resamples": resamples}
    if not len(pos) or not len(neg):
        return (
            out
            | dict.fromkeys(("auc_backbone", "auc_adapter", "gain", "gain_mean", "ci", "p"))
            | {"class": "n/a"}
        )
    auc_b, auc_a = float(roc_auc_score(y, b)), float(roc_auc_score(y, a))
    rng, gains = np.random.default_rng(seed), np.zeros(resamples)
    block = max(1, 2_000_000 // len(y))  # resamples per call: bounded memory
    same = np.array_equal(a, b)  # a zero update (the gate kept the backbone): every gain is 0
    for lo in range(0, 0 if same else resamples, block):
        r = min(block, resamples - lo)
        ip, ineg = (
            pos[rng.integers(0, len(pos), (r, len(pos)))],
            neg[rng.integers(0, len(neg), (r, len(neg)))],
        )
        u_a, u_b = (
            mannwhitneyu(m[ip], m[ineg], axis=1, method="asymptotic").statistic for m in (a, b)
        )
        gains[lo : lo + r] = (u_a - u_b) / (len(pos) * len(neg))
    p = float(((gains < 0).sum() + 0.5 * (gains == 0).sum()) / resamples)
    tail = 100 * (1 - level) / 2
    return out | {
        "auc_backbone": auc_b,
        "auc_adapter": auc_a,
        "gain": auc_a - auc_b,
        "gain_mean": float(gains.mean()),
        "ci": [float(v) for v in np.percentile(gains, [tail, 100 - tail])],
        "p": p,
        "class": classify(p),
    }


def gate_of(manifest: dict, confidence: float) -> dict:
    """What the gate did to one bundle, from its manifest: ``{"decision", "confidence", ...}``.

    ``adapter``: the trained state serves; ``backbone (gate)``: it beat the backbone on the
    early-stopping half but in under ``confidence`` of the gate's resamples, so the bundle holds
    the zero update; ``backbone (no gain)``: no trained state beat the backbone on validation.
    """
    train = manifest["metrics"].get("train", {})
    conf, kept = train.get("gain_confidence"), train.get("best_epoch", 0) > 0
    decision = (
        "adapter" if kept else "backbone (gate)" if conf is not None else "backbone (no gain)"
    )
    return {
        "decision": decision,
        "confidence": conf,
        "threshold": confidence,
        "best_epoch": train.get("best_epoch"),
        "validation": manifest["metrics"].get("validation", {}),
    }


def compare(base: dict, tuned: dict, gates: dict, resamples: int, seed: int) -> dict:
    """Per-domain and total figures of one cell's two scorings of the same test rows."""
    import torch

    from mdlora.trainer.adapt import domain_seed
    from mdlora.trainer.metrics import DomainMetrics

    if not (
        np.array_equal(base["domain"], tuned["domain"])
        and np.array_equal(base["label"], tuned["label"])
    ):
        raise RuntimeError("the two scorings returned the test rows in different orders")
    names = sorted(set(base["domain"].tolist()))
    ids = np.searchsorted(np.array(names), base["domain"])
    metrics = {}
    for kind, pred in (("backbone", base), ("adapters", tuned)):
        m = DomainMetrics(names)
        m.update(
            torch.from_numpy(pred["prob"]),
            torch.from_numpy(pred["label"].astype(np.float32)),
            torch.from_numpy(ids),
        )
        metrics[kind] = m.compute(gather=False)
    domains = {}
    for d in names:
        rows = base["domain"] == d
        test = paired_bootstrap(
            base["label"][rows],
            base["prob"][rows],
            tuned["prob"][rows],
            resamples=resamples,
            seed=domain_seed(seed, d),
        )
        domains[d] = test | {
            "logloss_backbone": metrics["backbone"]["domains"][d]["logloss"],
            "logloss_adapter": metrics["adapters"]["domains"][d]["logloss"],
            "pos_rate": metrics["backbone"]["domains"][d]["pos_rate"],
            "adapter_version": str(tuned["adapter"][rows][0]) or None,
            "gate": gates.get(d),
        }
    total = paired_bootstrap(
        base["label"], base["prob"], tuned["prob"], resamples=resamples, seed=seed
    )
    return {
        "domains": domains,
        "total": total
        | {
            k + "_" + kind: metrics[kind][k]
            for kind in ("backbone", "adapters")
            for k in ("auc", "wauc", "logloss")
        },
    }
