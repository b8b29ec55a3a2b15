"""Sharding plans simulated for topologies this CPU machine does not have; ``mdlora plan`` CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from mdlora.embeddings import sharding
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc, pooled_keys
from mdlora.jobs.cli import main


def _schema(rows: int, dim: int, n: int = 4) -> Schema:
    return Schema.from_dict(
        {
            "name": "sim",
            "label": "click",
            "domain": {"column": "domain", "values": ["a"]},
            "tables": [{"name": f"t{i}", "num_embeddings": rows, "dim": dim} for i in range(n)],
            "sparse": [{"name": f"f{i}", "table": f"t{i}"} for i in range(n)],
        }
    )


def test_build_ebc_on_meta_and_pooled_key_order(tiny_schema_dict):
    schema = Schema.from_dict(tiny_schema_dict)
    ebc = build_ebc(schema)
    assert all(p.is_meta for p in ebc.parameters())
    # tables in schema order, features within a table: hist (item) comes before city (cat)
    assert pooled_keys(schema) == ["user_id", "item_id", "hist", "city"]
    assert [t.name for t in sharding.module_tables(ebc)] == ["user", "item", "cat"]


def test_cuda_world8_row_wise_plan_and_bytes():
    schema = _schema(rows=10_000_000, dim=64)
    ebc = build_ebc(schema)
    sharding.apply_sparse_optimizer(ebc, "adam", 0.01, "cuda")
    plan = sharding.plan_for(
        ebc, 8, "cuda", hbm_gb=80, sharding_types=["row_wise"], batch_size=4096
    )
    d = sharding.plan_to_dict(plan, schema.tables, "adam", world_size=8)
    json.dumps(d)  # JSON-able
    for t in d["tables"].values():
        assert t["sharding_type"] == "row_wise" and t["ranks"] == list(range(8))
        assert sum(s["sizes"][0] for s in t["shards"]) == 10_000_000
    # adam: weights + 2 moments, fp32, spread evenly: 4 tables * 1e7 * 64 * 4 B * 3 / 8 ranks
    assert d["rank_bytes"] == [4 * 10_000_000 * 64 * 4 * 3 // 8] * 8
    text = sharding.format_plan(d)
    assert "row_wise" in text and "rank 7" in text


def test_tables_that_do_not_fit_name_the_bytes():
    schema = _schema(rows=1_000_000_000, dim=128, n=2)  # 2 * 1e9 * (128 + 1 momentum) * 4 B
    ebc = build_ebc(schema)
    sharding.apply_sparse_optimizer(ebc, "rowwise_adagrad", 0.05, "cuda")
    with pytest.raises(
        ValueError,
        match=r"do not fit on 8 x cuda ranks: they need 961\.125 GB.*each rank has 1\.000 GB",
    ):
        sharding.plan_for(ebc, 8, "cuda", hbm_gb=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sharding_types": ["row_wise"]}, r"table 't0': row_wise sharding needs device cuda"),
        (
            {"table_sharding": {"t2": ["table_row_wise"]}},
            r"table 't2': table_row_wise sharding needs device cuda",
        ),
        ({"table_sharding": {"nope": ["table_wise"]}}, r"unknown tables \['nope'\]"),
    ],
)
def test_cpu_constraint_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharding.plan_for(build_ebc(_schema(100, 8)), 2, "cpu", **kwargs)


def test_sparse_optimizer_checks():
    ebc = build_ebc(_schema(100, 8))
    with pytest.raises(ValueError, match="adam is GPU-only"):
        sharding.apply_sparse_optimizer(ebc, "adam", 0.01, "cpu")
    sharding.apply_sparse_optimizer(ebc, "sgd", 0.01, "cpu")
    sharding.apply_sparse_optimizer(ebc, "sgd", 0.01, "cpu")  # same again: no-op
    with pytest.raises(ValueError, match="different sparse optimizer"):
        sharding.apply_sparse_optimizer(ebc, "adagrad", 0.01, "cpu")


def test_cpu_plan_defaults_to_sharded_fused_tables():
    plan = sharding.plan_for(build_ebc(_schema(1000, 16)), 2, "cpu")
    d = sharding.plan_to_dict(plan, _schema(1000, 16).tables)
    assert {t["compute_kernel"] for t in d["tables"].values()} == {"fused"}
    assert {t["sharding_type"] for t in d["tables"].values()} <= set(
        sharding.DEFAULT_SHARDING["cpu"]
    )


def test_plan_cli_exit_codes(tmp_path, capsys, tiny_schema_dict):
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(tiny_schema_dict))
    (tmp_path / "run.yaml").write_text("data: {schema: schema.yaml}\n")
    cfg = str(tmp_path / "run.yaml")

    assert (
        main(
            [
                "plan",
                "--config",
                cfg,
                "--world-size",
                "8",
                "--device",
                "cuda",
                "--hbm-gb",
                "80",
                "--set",
                "dist.sharding_types=[row_wise]",
                "--json",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == 8 and d["tables"]["user"]["sharding_type"] == "row_wise"

    assert main(["plan", "--config", cfg, "--world-size", "2", "--device", "cpu"]) == 0
    assert "memory per rank" in capsys.readouterr().out

    assert (
        main(
            [
                "plan",
                "--config",
                cfg,
                "--world-size",
                "2",
                "--device",
                "cpu",
                "--set",
                "dist.table_sharding={user: [row_wise]}",
            ]
        )
        == 2
    )
    assert "table 'user': row_wise sharding needs device cuda" in capsys.readouterr().err

    big = dict(
        tiny_schema_dict,
        tables=[dict(t, num_embeddings=10**9, dim=128) for t in tiny_schema_dict["tables"]],
    )
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(big))
    assert (
        main(["plan", "--config", cfg, "--world-size", "8", "--device", "cuda", "--hbm-gb", "1"])
        == 2
    )
    assert "do not fit" in capsys.readouterr().err
