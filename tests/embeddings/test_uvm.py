"""UVM caching (``dist.uvm``) simulated on CPU: 8 cuda ranks planned without a GPU.

A table too big for HBM plans as ``fused_uvm_caching`` under the host budget; without the knob,
or without host memory enough, it is refused naming the bytes and the knob.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mdlora.embeddings import plan_view, sharding
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc
from mdlora.jobs.cli import main
from mdlora.trainer.config import DistConfig

ROOT = Path(__file__).resolve().parents[2]
GB = 2**30
BIG = 2_000_000_000  # rows of the user table: 2e9 x 128 fp32 = 954 GB, more than 8 x 80 GB HBM


def _ebc(rows: int = BIG, opt: str = "rowwise_adagrad"):
    schema = Schema.from_dict(
        {
            "name": "uvm",
            "label": "click",
            "domain": {"column": "domain", "values": ["a"]},
            "tables": [
                {"name": "user", "num_embeddings": rows, "dim": 128},
                {"name": "item", "num_embeddings": 1_000_000, "dim": 64},
            ],
            "sparse": [{"name": "u", "table": "user"}, {"name": "i", "table": "item"}],
        }
    )
    ebc = build_ebc(schema)
    sharding.apply_sparse_optimizer(ebc, opt, 0.05, "cuda")
    return schema, ebc


def test_table_too_big_for_hbm_plans_uvm_cached_within_both_budgets():
    schema, ebc = _ebc()
    plan = sharding.plan_for(ebc, 8, "cuda", hbm_gb=80, uvm=True, host_gb=240, cache_ratio=0.25)
    d = plan_view.plan_to_dict(plan, schema.tables, "rowwise_adagrad", world_size=8)
    json.dumps(d)
    user, item = d["tables"]["user"], d["tables"]["item"]
    assert user["compute_kernel"] == "fused_uvm_caching" and user["cache_ratio"] == 0.25
    assert plan.plan[""]["user"].cache_params.load_factor == 0.25  # what fbgemm's TBE gets
    assert item["compute_kernel"] == "fused" and item["cache_ratio"] is None  # fits: stays in HBM
    assert d["device_type"] == "cuda"
    # the UVM table's rows + optimiser state are all in host memory, spread over the ranks
    assert sum(d["rank_host_bytes"]) == plan_view.table_bytes(BIG, 128, "rowwise_adagrad")
    assert max(d["rank_hbm_bytes"]) <= 80 * GB * 0.85  # reserved share held back
    assert max(d["rank_host_bytes"]) <= 240 * GB
    assert all(h > 0 for h in d["rank_hbm_bytes"])  # every rank caches its rows in HBM


def test_per_shard_bytes_agree_with_torchrecs_estimator():
    _, ebc = _ebc()
    cons = sharding._constraints(["user", "item"], "cuda", [], {}, 0.2)
    planner = sharding.make_planner(8, "cuda", 80, cons, 512, host_gb=240)
    planner.plan(ebc, sharding.sharders("cuda"))
    options = {so.name: so for so in planner._best_plan}  # the estimator's storage per shard
    user = options["user"]
    assert user.compute_kernel == "fused_uvm_caching"
    for shard in user.shards:
        rows, cols = shard.size
        hbm, host = plan_view.shard_memory(
            rows, cols, "rowwise_adagrad", "fused_uvm_caching", "cuda", 0.2
        )
        assert shard.storage.ddr == host
        # the estimator adds the shard's input/output buffers (a few MB) to the cache
        assert 0 <= shard.storage.hbm - hbm < 0.001 * hbm


def test_uvm_off_refuses_naming_the_bytes_and_the_knob():
    _, ebc = _ebc()
    with pytest.raises(
        ValueError,
        match=r"do not fit on 8 x cuda ranks: they need 961\.\d+ GB.*each rank has 80\.000 GB"
        r".*set dist\.uvm=true",
    ):
        sharding.plan_for(ebc, 8, "cuda", hbm_gb=80)


def test_uvm_refuses_when_host_memory_is_short_too():
    _, ebc = _ebc()
    with pytest.raises(
        ValueError, match=r"with dist\.uvm=true 100\.000 GB of host memory.*raise dist\.host_gb"
    ):
        sharding.plan_for(ebc, 8, "cuda", hbm_gb=80, uvm=True, host_gb=100)


def test_uvm_keeps_tables_that_fit_in_hbm():
    schema, ebc = _ebc(rows=10_000_000)
    plan = sharding.plan_for(ebc, 8, "cuda", hbm_gb=80, uvm=True, host_gb=240)
    d = plan_view.plan_to_dict(plan, schema.tables, "rowwise_adagrad", world_size=8)
    assert {t["compute_kernel"] for t in d["tables"].values()} == {"fused"}
    assert d["rank_host_bytes"] == [0] * 8 and d["rank_hbm_bytes"] == d["rank_bytes"]


def test_uvm_on_cpu_is_refused_and_cpu_tables_are_host_memory():
    schema = Schema.from_dict(
        {
            "name": "c",
            "label": "click",
            "domain": {"column": "domain", "values": ["a"]},
            "tables": [{"name": "t", "num_embeddings": 100, "dim": 8}],
            "sparse": [{"name": "f", "table": "t"}],
        }
    )
    with pytest.raises(ValueError, match=r"dist\.uvm: .*needs device cuda"):
        sharding.plan_for(build_ebc(schema), 2, "cpu", uvm=True)
    plan = sharding.plan_for(build_ebc(schema), 2, "cpu")
    d = plan_view.plan_to_dict(plan, schema.tables, world_size=2)
    assert d["device_type"] == "cpu" and d["rank_hbm_bytes"] == [0, 0]
    assert d["rank_host_bytes"] == d["rank_bytes"] and sum(d["rank_bytes"]) == 100 * 8 * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"uvm_cache_ratio": 0.0}, r"uvm_cache_ratio: must be in \(0, 1\]"),
        ({"uvm_cache_ratio": 1.5}, r"uvm_cache_ratio: must be in \(0, 1\]"),
        ({"host_gb": -1.0}, r"host_gb: must be >= 0"),
    ],
)
def test_dist_config_checks_uvm_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistConfig(device="cuda", uvm=True, **kwargs)


def test_plan_cli_prints_kernel_cache_and_memory_columns(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its schema relative to the checkout
    assert main(["plan", "--config", "configs/uvm-2b/pretrain.yaml"]) == 0
    out = capsys.readouterr().out
    user = next(line for line in out.splitlines() if line.startswith("user "))
    assert "row_wise" in user and "fused_uvm_caching" in user and "0.20" in user
    assert "HBM" in out and "host" in out and "rank 7" in out

    args = ["plan", "--config", "configs/uvm-2b/pretrain.yaml", "--set", "dist.uvm=false"]
    assert main(args) == 2
    assert "set dist.uvm=true" in capsys.readouterr().err
