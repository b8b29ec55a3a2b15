"""Exact per-domain CTR metrics: AUC, log loss, NE, calibration, row count and positive rate.

Rows (probability, label, domain id) are kept on CPU. At :meth:`DomainMetrics.compute`,
when ``torch.distributed`` is initialised, every rank's rows are gathered
(``all_gather_object``, concatenated in rank order), so every rank gets the same, exact
result, not an average of per-rank figures. AUC and log loss come from scikit-learn.

Definitions (K domains, n_k rows of domain k):

- ``auc``: ROC AUC over the rows; ``None`` when they hold a single class (or none).
- ``logloss``: mean BCE with probabilities clipped to [1e-7, 1 - 1e-7]; ``None`` without rows.
- ``wauc = sum_k n_k auc_k / sum_k n_k`` over domains whose AUC is defined: domains with a
  single class (or no rows) are left out of the weights; ``None`` when no domain has an AUC.
- ``ne`` (normalised entropy, TorchRec ``torchrec/metrics/ne.py``, unit weights, eta = 1e-12):
  ``NE = sum_i CE(p_i, y_i) / -(P log2 q + N log2 (1 - q))`` with
  ``CE(p, y) = -y log2 p' - (1 - y) log2 (1 - p')``, ``p' = clip(p, eta, 1 - eta)``, P positives,
  N negatives and base rate ``q = clip(P / (P + N), eta, 1 - eta)``; that is, the mean log loss
  over the entropy of the base rate (the log base cancels). NE < 1: better than predicting the
  base rate for every row. TorchRec clips at 1e-12, not 1e-7 as ``logloss`` does, so
  ``ne = logloss / H(q)`` only while no probability lies within 1e-7 of 0 or 1. ``None`` when
  the rows hold a single class (or none): the entropy is 0 (TorchRec returns a huge number).
- ``calibration`` (TorchRec ``torchrec/metrics/calibration.py``, unit weights):
  ``sum_i p_i / P``, unclipped probabilities; 1 means as many clicks predicted as seen.
  ``None`` without positives (TorchRec returns 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score

_EPS = 1e-7
_ETA = 1e-12  # TorchRec NEMetricComputation.eta


def _ne(probs: np.ndarray, labels: np.ndarray) -> float:
    """TorchRec's NE of rows holding both classes (``compute_ne`` with unit weights)."""
    p = np.clip(probs, _ETA, 1 - _ETA)
    ce_sum = np.sum(-labels * np.log2(p) - (1.0 - labels) * np.log2(1.0 - p))
    pos, neg = labels.sum(), (1.0 - labels).sum()
    q = np.clip(pos / max(pos + neg, _ETA), _ETA, 1 - _ETA)
    return float(ce_sum / (-pos * np.log2(q) - neg * np.log2(1.0 - q)))


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """``{"auc", "logloss", "ne", "calibration", "n", "pos_rate"}`` of one group of rows."""
    n, pos = int(labels.shape[0]), float(labels.sum())
    if n == 0:
        return {
            "auc": None,
            "logloss": None,
            "ne": None,
            "calibration": None,
            "n": 0,
            "pos_rate": None,
        }
    both = 0 < pos < n
    return {
        "auc": float(roc_auc_score(labels, probs)) if both else None,
        "logloss": float(log_loss(labels, np.clip(probs, _EPS, 1 - _EPS), labels=[0, 1])),
        "ne": _ne(probs, labels) if both else None,
        "calibration": float(probs.sum() / pos) if pos > 0 else None,
        "n": n,
        "pos_rate": pos / n,
    }


class DomainMetrics:
    """Accumulates predictions of one evaluation and computes per-domain metrics.

    Args:
        domain_names: name of each domain id (``schema.domain.values``), K of them.

    Example::

        m = DomainMetrics(["a", "b"])
        for batch in val:
            m.update(task.predict(batch), batch.labels, batch.domains)
        result = m.compute()  # same dict on every rank
        print(format_table(result))
    """

    def __init__(self, domain_names: list[str]) -> None:
        self.domain_names = list(domain_names)
        self.reset()

    def reset(self) -> None:
        """Forget every row seen so far."""
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._domains: list[np.ndarray] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor) -> None:
        """Add one batch of rows.

        Args:
            probs: [B] click probabilities in [0, 1].
            labels: [B] labels in {0, 1}.
            domains: [B] int domain ids in [0, K).

        Raises:
            ValueError: shapes differ, or a domain id is outside [0, K).
        """
        p = probs.detach().to("cpu", torch.float64).reshape(-1).numpy()
        y = labels.detach().to("cpu", torch.float64).reshape(-1).numpy()
        d = domains.detach().to("cpu", torch.int64).reshape(-1).numpy()
        if not p.shape == y.shape == d.shape:
            raise ValueError(f"update: probs {p.shape}, labels {y.shape}, domains {d.shape} differ")
        bad = d[(d < 0) | (d >= len(self.domain_names))]
        if bad.size:
            raise ValueError(
                f"domains: id {int(bad[0])} outside [0, {len(self.domain_names)}) "
                f"(domains {self.domain_names})"
            )
        self._probs.append(p)
        self._labels.append(y)
        self._domains.append(d)

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (probs, labels, domains), each [R]."""
        if not self._probs:
            return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
        return (
            np.concatenate(self._probs),
            np.concatenate(self._labels),
            np.concatenate(self._domains),
        )

    def compute(self, gather: bool = True) -> dict:
        """Metrics over every row seen (on every rank when gathering).

        Args:
            gather: gather rows from all ranks when ``torch.distributed`` is initialised; every
                rank must call it (collective). ``False``: this rank's rows only.

        Returns:
            ``{"domains": {name: {"auc", "logloss", "ne", "calibration", "n", "pos_rate"}},
            "auc", "logloss", "ne", "calibration", "wauc", "n", "pos_rate"}`` (top-level figures
            over all rows); definitions and ``None`` cases in the module docstring.
        """
        p, y, d = self._rows()
        if gather and dist.is_available() and dist.is_initialized():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (p, y, d))
            p, y, d = (np.concatenate(x) for x in zip(*parts, strict=True))
        domains = {name: _scores(p[d == k], y[d == k]) for k, name in enumerate(self.domain_names)}
        scored = [m for m in domains.values() if m["auc"] is not None]
        total = _scores(p, y)
        wauc = (
            (sum(m["n"] * m["auc"] for m in scored) / sum(m["n"] for m in scored))
            if scored
            else None
        )
        return {
            "domains": domains,
            "auc": total["auc"],
            "logloss": total["logloss"],
            "ne": total["ne"],
            "calibration": total["calibration"],
            "wauc": wauc,
            "n": total["n"],
            "pos_rate": total["pos_rate"],
        }


def format_table(metrics: dict) -> str:
    """Fixed-width text table of a :meth:`DomainMetrics.compute` result.

    Args:
        metrics: the result dict.

    Returns:
        One row per domain (n, pos_rate, auc, logloss, ne, calibration), an ``ALL`` row and a
        ``WAUC`` line; undefined values print as ``-``.
    """

    def f(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    def row(name: str, m: dict) -> str:
        return (
            f"{name:<16} {m['n']:>10} {f(m['pos_rate']):>9} {f(m['auc']):>8} {f(m['logloss']):>8}"
            f" {f(m['ne']):>8} {f(m['calibration']):>11}"
        )

    lines = [
        f"{'domain':<16} {'n':>10} {'pos_rate':>9} {'auc':>8} {'logloss':>8} {'ne':>8} {'calibration':>11}"
    ]
    lines += [row(name, m) for name, m in metrics["domains"].items()]
    lines += [row("ALL", metrics), f"WAUC {f(metrics['wauc'])}"]
    return "\n".join(lines)
