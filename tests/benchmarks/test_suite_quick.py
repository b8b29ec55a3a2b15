"""The one CI run of the benchmark suite: ``python -m benchmarks.suite --quick`` end to end.

Real subprocesses (plain PyTorch, torchrun, Ray Train, a moto S3 server); checks that every
section is filled with positive numbers and every missed target names a bottleneck.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 900  # a hung run fails the test; how long the quick suite takes is a figure in its JSON


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "suite.json").read_text())


@pytest.mark.integration
def test_quick_suite_fills_every_section(suite):
    out, res = suite
    assert {"peers", "limit", "scaling", "adaptation", "reader", "scoring", "targets"} <= set(res)
    for name, worlds in (("reference", ["1", "2"]),):  # quick: the reference workload only
        wl = res["peers"][name]
        assert sorted(wl["torchrec"]) == sorted(wl["mdlora"]) == worlds
        systems = [*wl["plain"].values(), *wl["torchrec"].values(), *wl["mdlora"].values()]
        for r in systems:
            assert "error" not in r, r
            assert _positive(r["samples_per_s"]) and _positive(r["time_to_first_batch_s"])
            assert len(r["peak_rss_mb"]) == r["world_size"] and all(
                x > 50 for x in r["peak_rss_mb"]
            )
        assert [len(wl["mdlora"][w]["embedding_bytes_per_rank"]) for w in worlds] == list(
            map(int, worlds)
        )
        limit = res["limit"][name]
        assert _positive(limit["bound"]["samples_per_s"]) and len(limit["share_of_bound"]) == len(
            systems
        )
        assert all(_positive(v) for v in limit["share_of_bound"].values())
    assert _positive(res["peers"]["reference"]["ab"]["1"]["ratio"])
    sc = res["scaling"]
    assert len(sc["rows"]["sizes"]) == 3 and all(
        _positive(r["cost_us_per_row"]) for r in sc["rows"]["sizes"]
    )
    assert [r["domains"] for r in sc["domains"]["counts"]] == [3, 30, 300]
    assert all(_positive(r["seconds"]) for r in sc["domains"]["counts"])
    for r in sc["table_size"]["sizes"]:  # 2 workers hold the tables between them
        assert len(r["bytes_per_rank_w2"]) == 2 and sum(r["bytes_per_rank_w2"]) == sum(
            r["bytes_per_rank_w1"]
        )
    assert all(_positive(v) for v in res["adaptation"]["figures"].values())
    assert 0 < res["adaptation"]["bundle_size"]["ratio"] < 0.01
    rd = res["reader"]
    assert all(
        _positive(rd[k])
        for k in ("local_e2e_shuffled_rows_per_cpu_s", "s3_e2e_shuffled_rows_per_cpu_s")
    )
    so = res["scoring"]
    assert _positive(so["rows_per_s"]["adapters"]) and _positive(so["rows_per_s"]["backbone"])
    assert so["adapters_loaded"] == so["domains"] and so["adapters_change_scores"]


@pytest.mark.integration
def test_quick_suite_verdicts_and_outputs(suite):
    out, res = suite
    sections = {t["section"] for t in res["targets"]}
    assert sections == {"peers", "limit", "scaling", "adaptation", "reader", "scoring"}
    for t in res["targets"]:
        assert _positive(t["measured"]), t
        assert t["met"] in (True, False, None)
        if t["met"] is False:
            assert t["bottleneck"], t  # a missed target names where the time went
    md = (out / "suite.md").read_text()
    for heading in (
        "## Peers: reference",
        "## Limit",
        "## Scaling",
        "## Adaptation",
    ):
        assert heading in md
    assert (out / "suite.png").read_bytes()[:4] == b"\x89PNG"
