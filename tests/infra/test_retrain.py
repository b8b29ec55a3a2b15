"""The retrain report: each side's holdout figures (AUC, LogLoss, NE, calibration) in JSON and Markdown."""

from __future__ import annotations

from types import SimpleNamespace

from mdlora.infra.retrain import _side, markdown


def test_report_sides_and_markdown_carry_ne_and_calibration():
    champion = SimpleNamespace(versions={}, backbone_of={}, info=SimpleNamespace(version="v0001"))
    challenger = SimpleNamespace(versions={"a": "v0003"}, backbone_of={"a": "v0002"},
                                 info=SimpleNamespace(version="v0002"))
    old = {"a": {"rows": 10, "auc": 0.7, "logloss": 0.5, "ne": 0.91, "calibration": 1.1}}
    new = {"a": {"rows": 10, "auc": 0.75, "logloss": 0.45, "ne": 0.82, "calibration": None}}
    sides = {"champion": _side(champion, old, "a"), "challenger": _side(challenger, new, "a")}
    assert sides["champion"] == {"adapter": None, "backbone": "v0001", "rows": 10, "auc": 0.7,
                                 "logloss": 0.5, "ne": 0.91, "calibration": 1.1}
    assert _side(champion, {}, "a")["ne"] is None
    report = {"model": "ctr", "window": "w", "run_key": "k", "backbone": {"version": "v0002", "step": 5},
              "champion": {"version": "v0001"}, "production_backbone": "v0002", "backbone_promoted": True,
              "gate": {"metric": "auc", "holdout": "h", "tolerance": 0.0},
              "domains": {"a": sides | {"holdout": "h", "decision": "promote", "reason": "r"}}}
    lines = markdown(report).splitlines()
    header = next(line for line in lines if line.startswith("| domain |"))
    row = next(line for line in lines if line.startswith("| a |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|")) == 14
    assert header.count("| NE |") == 2 and header.count("| Calibration |") == 2
    assert cells[1:12] == ["10", "backbone only @ v0001", "0.7000", "0.5000", "0.9100", "1.1000",
                           "v0003 @ v0002", "0.7500", "0.4500", "0.8200", "-"]
    # a side recorded before NE and calibration were (a resumed run's state.json) prints '-'
    del report["domains"]["a"]["champion"]["ne"]
    assert "| backbone only @ v0001 | 0.7000 | 0.5000 | - | 1.1000 |" in markdown(report)
