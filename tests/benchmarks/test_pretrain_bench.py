"""The pretrain benchmark's peer section in quick mode: real subprocesses, real torchrun."""

from __future__ import annotations

import json

import pytest

from benchmarks.common import (
    Reference,
    compute_bound,
    flops_per_sample,
    machine,
    mlp_shapes,
    reference_ids,
    write_results,
)
from benchmarks.peers import measure_peers
from benchmarks.pretrain import markdown, summarise


def test_reference_shapes_and_ids():
    ref = Reference(rows=1000)
    assert mlp_shapes(ref) == [(160, 256), (256, 128), (128, 1)]
    assert flops_per_sample(ref) == 6 * (160 * 256 + 256 * 128 + 128)
    ids = reference_ids(ref, 5000, seed=1)
    assert ids.shape == (10, 5000) and ids.min() >= 0 and ids.max() < 1000
    assert (reference_ids(ref, 5000, seed=1) == ids).all()
    # Zipf: the hottest id of a feature is far above the uniform share (5000 / 1000 = 5)
    assert max(int((ids[0] == v).sum()) for v in set(ids[0, :50].tolist())) > 50


@pytest.mark.integration
def test_peers_quick_writes_positive_numbers(tmp_path):
    ref = Reference(rows=2000)
    res = {"quick": True, "machine": machine(), "mdlora": {}}
    res["bound"] = compute_bound(ref, seconds=0.1)
    res["peers"] = measure_peers(
        ref,
        steps=3,
        warmup=1,
        work=tmp_path,
        variants=("sparse_adagrad",),
        world_sizes=(1,),
        timeout=120,
    )
    res["summary"] = summarise(res)
    write_results(tmp_path / "pretrain.json", res, markdown(res))

    out = json.loads((tmp_path / "pretrain.json").read_text())
    plain, tr = out["peers"]["plain"]["sparse_adagrad"], out["peers"]["torchrec"]["1"]
    assert "error" not in plain, plain
    assert "error" not in tr, tr
    for r in (plain, tr):
        assert r["samples_per_s"] > 0 and r["time_to_first_batch_s"] > 0 and r["steps"] == 3
        assert len(r["peak_rss_mb"]) == r["world_size"] == 1 and r["peak_rss_mb"][0] > 50
    assert tr["embedding_weight_bytes_per_rank"] == [10 * 2000 * 16 * 4]
    assert out["bound"]["samples_per_s"] > 0 and out["bound"]["gemm_flops_1_thread"] > 0
    assert out["summary"]["plain_best_variant"] == "sparse_adagrad"
    md = (tmp_path / "pretrain.md").read_text()
    assert "raw TorchRec (torchrun)" in md and "plain PyTorch (sparse_adagrad)" in md


def test_steady_rate_skips_warmup_and_weights_by_time():
    from benchmarks.pretrain import _steady

    # (arrival time, step, samples/s of the interval ending at step); log_every 10, B 100
    lines = [(0.0, 10, 1), (1.0, 20, 1000), (2.0, 30, 4000)]
    # intervals starting at >= step 10: 1000 samples at 1000/s (1 s) + 1000 at 4000/s (0.25 s)
    assert _steady(lines, after=10, log_every=10, batch=100) == 2000 / 1.25
    assert _steady(lines, after=25, log_every=10, batch=100) is None
