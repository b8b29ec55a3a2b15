"""Progress lines: rate and ETA from the counts, at most one line per interval, one at the end."""

from __future__ import annotations

import logging

from mdlora.progress import Progress


def test_lines_carry_rate_and_eta_at_most_every_interval(caplog):
    now = [100.0]
    p = Progress("materialise train", total=1000, every=10, clock=lambda: now[0], bar=False)
    with caplog.at_level(logging.INFO, logger="mdlora.progress"):
        for _ in range(4):  # 100 rows a second, a report due every 10 s
            now[0] += 4
            p.add(400 if now[0] < 110 else 100)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "materialise train: 900/1,000 rows (90%), 75 rows/s, ETA 1 s"  # at 12 s
    assert lines[-1] == "materialise train: 1,000/1,000 rows (100%), 62 rows/s, 16 s"
    assert len(lines) == 2  # 4 adds over 16 s: one interval report, then the final line


def test_unknown_total_gives_rate_only():
    p = Progress("score", every=1e9, clock=lambda: 2.0, bar=False)
    p.start = 0.0
    p.add(50)
    assert p.line() == "score: 50 rows, 25 rows/s"


def test_a_stage_shorter_than_one_interval_prints_nothing(caplog):
    now = [0.0]
    p = Progress("score", total=10, every=10, clock=lambda: now[0], bar=False)
    with caplog.at_level(logging.INFO, logger="mdlora.progress"):
        now[0] = 3.0
        p.add(10)
        p.close()
    assert caplog.records == []
