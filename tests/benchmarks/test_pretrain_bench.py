"""Fast checks of the benchmark arithmetic (the suite itself runs in test_suite_quick.py)."""

from __future__ import annotations

from benchmarks.common import Reference, flops_per_sample, mlp_shapes, reference_ids
from benchmarks.pretrain import steady
from benchmarks.profiling import bottleneck, summarise


def test_reference_shapes_and_ids():
    ref = Reference(rows=1000)
    assert mlp_shapes(160, [256, 128]) == [(160, 256), (256, 128), (128, 1)]
    assert flops_per_sample(160, [256, 128]) == 6 * (160 * 256 + 256 * 128 + 128)
    ids = reference_ids(ref, 5000, seed=1)
    assert ids.shape == (10, 5000) and ids.min() >= 0 and ids.max() < 1000
    assert (reference_ids(ref, 5000, seed=1) == ids).all()
    # Zipf: the hottest id of a feature is far above the uniform share (5000 / 1000 = 5)
    assert max(int((ids[0] == v).sum()) for v in set(ids[0, :50].tolist())) > 50


def test_steady_rate_skips_warmup_and_weights_by_time():
    # (arrival time, step, samples/s of the interval ending at step); log_every 10, B 100
    lines = [(0.0, 10, 1), (1.0, 20, 1000), (2.0, 30, 4000)]
    # intervals starting at >= step 10: 1000 samples at 1000/s (1 s) + 1000 at 4000/s (0.25 s)
    assert steady(lines, after=10, log_every=10, batch=100) == 2000 / 1.25
    assert steady(lines, after=25, log_every=10, batch=100) is None


def test_profile_summary_picks_the_busy_thread_and_names_phases(tmp_path):
    raw = tmp_path / "p.raw"
    raw.write_text(
        "thread (1): Main;a (x.py:1);Condition.wait (threading.py:327) 90\n"
        "thread (2): Train;train (trainer/loop.py:1);backward (torch/autograd/__init__.py:1);"
        "_engine_run_backward (torch/autograd/graph.py:9) 60\n"
        "thread (2): Train;train (trainer/loop.py:1);CTRTask.forward (trainer/task.py:4) 30\n"
        "thread (2): Train;train (trainer/loop.py:1);_prefetched (infra/logs.py:3);Queue.get (queue.py:1) 10\n"
    )
    s = summarise(raw)
    assert s["thread"] == "thread (2): Train" and s["samples"] == 100
    assert list(s["phases"].items())[0] == (
        "backward (incl. fused sparse update, DDP all-reduce)",
        0.6,
    )
    assert s["phases"]["waiting for the next batch"] == 0.1
    assert s["top_own"][0] == ["_engine_run_backward (graph.py:9)", 0.6]
    assert "backward" in bottleneck(s) and summarise(tmp_path / "missing.raw") is None
