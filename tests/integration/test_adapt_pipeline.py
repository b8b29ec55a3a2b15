"""pretrain (2 Ray workers) -> adapt -> add-domain (held-out domain) -> score, on synthetic logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mdlora.atomic import sha256_file, sha256_tree, write_json
from mdlora.embeddings.schema import Schema
from mdlora.infra.adapt import adapt, add_domain
from mdlora.infra.artifacts.bundle import BundleError
from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.artifacts.sealed import read_manifest
from mdlora.infra.pretrain import pretrain
from mdlora.infra.score import Scorer
from mdlora.infra.storage import open_fs
from mdlora.infra.synth import generate
from mdlora.jobs.cli import main
from mdlora.trainer.config import load_adapt_config, load_run_config

pytestmark = pytest.mark.integration


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every version dir and alias file under ``root`` (relative path -> hash)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir() and p.name.startswith("v0"):
            out[str(p.relative_to(root))] = sha256_tree(p)[0]
        elif p.name == "aliases.json":
            out[str(p.relative_to(root))] = sha256_file(p)
    return out


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt")
    logs = base / "logs"
    generate(str(logs), rows=150_000, domains=6, seed=7, holdout_domains=1, users=300, items=300, days=2)
    reg = base / "reg"
    common = [f"data.schema={logs}/schema.yaml", f"data.train={logs}/train", f"data.val={logs}/val",
              "dist.world_size=2", "dist.max_failures=0", f"output.root={reg}", "output.model=ctr"]
    pretrain(load_run_config(None, common + ["data.batch_size=512", "loop.epochs=3", "loop.log_every=0",
                                             "model.hidden=[64,32]"]))
    overrides = common + [f"data.test={logs}/test", "data.batch_size=2048", "loop.epochs=8",
                          "loop.patience=2", "lora.alpha=4", "train.lr=0.01",
                          "train.confidence=0"]  # routing and publishing here; the gate: tests/trainer
    config = base / "adapt.yaml"
    config.write_text("\n".join(f"# --set {o}" for o in overrides))  # documents the run
    cfg = load_adapt_config(None, overrides)
    backbone_before = _tree_hashes(reg / "backbones")
    runs_before = set((reg / "runs").iterdir())
    summary = adapt(cfg)
    runs_after = set((reg / "runs").iterdir())
    yield {"base": base, "logs": logs, "reg": reg, "cfg": cfg, "overrides": overrides, "summary": summary,
           "backbone_before": backbone_before, "new_runs": runs_after - runs_before,
           "truth": json.loads((logs / "truth.json").read_text())}
    shutil.rmtree(base, ignore_errors=True)


def test_a_published_run_leaves_no_feature_cache_behind(world):
    assert world["new_runs"] == set(), world["new_runs"]  # its run dir (checkpoint, cache) is removed
    assert world["summary"]["rows"]["train"] > 0 and world["summary"]["rows"]["test"] > 0


def test_adapt_publishes_one_promoted_bundle_per_domain_and_beats_the_frozen_backbone(world):
    summary, reg, truth = world["summary"], world["reg"], world["truth"]
    domains = [d for d, t in truth["domains"].items() if not t["heldout"]]
    assert sorted(summary["bundles"]) == domains
    registry = Registry(*open_fs(str(reg)))
    schema = Schema.load(world["logs"] / "schema.yaml")
    e = schema.pooled_dim() + len(schema.dense)
    dense = e * 64 + 64 + 64 * 32 + 32 + 32 + 1  # tower mlp [64, 32] + output Linear(32, 1)
    for d in domains:
        assert registry.aliases("adapters", d) == {"latest": "v0001", "production": "v0001"}
        m = read_manifest(str(reg / "adapters" / d / "v0001"))
        assert m["backbone"]["content_hash"] == summary["backbone"]["content_hash"]
        assert m["param_share"] == pytest.approx(m["param_count"] / dense)
        assert m["metrics"]["test"]["samples"] == truth["domains"][d]["rows_per_split"]["test"]
    assert _tree_hashes(reg / "backbones") == world["backbone_before"]  # the backbone is untouched
    # Domains with the strongest injected shift (ground truth): the adapters must beat the frozen
    # backbone. At this test size single small domains are noisy, so the mean gain is asserted.
    strength = {d: truth["domains"][d]["shift_strength"] for d in domains}
    shifted = [d for d in domains if strength[d] >= np.median(list(strength.values()))]
    gains = [summary["bundles"][d]["metrics"]["test"]["auc_adapter"]
             - summary["bundles"][d]["metrics"]["test"]["auc_backbone"] for d in shifted]
    print("test AUC gain (adapter - backbone) on shifted domains:", dict(zip(shifted, gains, strict=True)))
    assert np.mean(gains) > 0, dict(zip(shifted, gains, strict=True))


def test_add_domain_writes_only_its_bundle_then_score_routes_every_row(world, capsys):
    reg, logs = world["reg"], world["logs"]
    before = _tree_hashes(reg)
    config = world["base"] / "adapt.yaml"
    args = [a for o in world["overrides"] for a in ("--set", o)]
    assert main(["add-domain", "--config", str(config), "--domain", "d05",
                 "--data", str(logs / "heldout" / "d05"), *args]) == 0
    after = _tree_hashes(reg)
    new = {k: v for k, v in after.items() if k not in before}
    assert {k: after[k] for k in before} == before  # every other bundle, alias file and the backbone
    assert sorted(new) == ["adapters/d05/aliases.json", "adapters/d05/v0001"]
    assert Registry(*open_fs(str(reg))).aliases("adapters", "d05")["production"] == "v0001"

    # score the main test split (5 domains) with every production bundle through the CLI
    out = world["base"] / "preds.parquet"
    assert main(["score", "--config", str(config), "--data", str(logs / "test"), "--out", str(out), *args]) == 0
    assert "fallback rows (no adapter for their domain): 0" in capsys.readouterr().out
    source = ds.dataset(str(logs / "test"), format="parquet", partitioning="hive").to_table()
    preds = pq.read_table(out)
    assert preds.num_rows == source.num_rows
    assert preds.column("domain").to_pylist() == source.column("domain").to_pylist()  # row order kept
    assert preds.column("click").to_pylist() == source.column("click").to_pylist()
    probs = preds.column("prob").to_numpy()
    assert np.all((probs > 0) & (probs < 1)) and set(preds.column("adapter_version").to_pylist()) == {"v0001"}

    # Python API: the held-out domain routes to its new adapter; a domain without a bundle falls back
    scorer = Scorer(str(reg), "ctr", bundles={"d05": "production"})
    held = ds.dataset(str(logs / "heldout" / "d05" / "test"), format="parquet", partitioning="hive").to_table()
    p_new, slots = scorer.score(held)
    assert (slots == 0).all() and len(p_new) == held.num_rows
    base_only = Scorer(str(reg), "ctr", bundles={})
    # the adapter changes the scores unless its early stopping kept the zero update: the domain
    # has ~150 validation rows, so which it is depends on the backbone's last float bits
    kept = read_manifest(str(reg / "adapters" / "d05" / "v0001"))["metrics"]
    trained = kept["train"]["best_epoch"] > 0
    assert np.allclose(p_new, base_only.score_table(held), atol=1e-7) != trained, kept
    assert not np.allclose(probs, base_only.score_table(source), atol=1e-6)  # the CLI applied d00..d04's adapters
    summary = scorer.score_dataset(str(logs / "test"), str(world["base"] / "fallback.parquet"))
    assert summary["fallback_rows"] == source.num_rows  # no d00..d04 bundle loaded: all fall back
    assert np.allclose(pq.read_table(world["base"] / "fallback.parquet").column("prob").to_numpy(),
                       base_only.score_table(source), atol=1e-6)


def test_score_refuses_a_bundle_of_another_backbone(world, tmp_path):
    reg = world["reg"]
    forged = tmp_path / "forged"
    shutil.copytree(reg / "adapters" / "d00" / "v0001", forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["backbone"]["content_hash"] = "0" * 64
    write_json(forged / "manifest.json", manifest)
    registry = Registry(*open_fs(str(reg)))
    version = registry.publish("adapters", "d00", forged)
    with pytest.raises(BundleError, match="backbone"):
        Scorer(str(reg), "ctr", bundles={"d00": version})


def test_wide_adapters_train_publish_and_score_as_trained(world, tmp_path):
    """lora.wide through adapt (ids cached beside x by the sharded materialisation) and score
    (ids from the rows): the scorer's per-domain test AUC is the one adapt measured."""
    reg = tmp_path / "reg"
    shutil.copytree(world["reg"], reg)
    cfg = load_adapt_config(None, world["overrides"] + [f"output.root={reg}", 'lora.wide=["*"]', "loop.epochs=3"])
    summary = adapt(cfg)
    versions = {d: b["version"] for d, b in summary["bundles"].items()}
    assert read_manifest(str(reg / "adapters" / "d01" / versions["d01"]))["lora"]["wide"] == ["*"]
    scored = Scorer(str(reg), "ctr", bundles=versions).score_dataset(str(world["logs"] / "test"),
                                                                     str(tmp_path / "preds.parquet"))
    moved = 0
    for d, b in summary["bundles"].items():
        test = b["metrics"]["test"]
        assert scored["domains"][d]["auc"] == pytest.approx(test["auc_adapter"], abs=2e-6), d
        moved += test["auc_adapter"] != test["auc_backbone"]
    assert moved, summary["bundles"]  # some domain kept a trained state: the wide path was exercised

    # add-domain trains with the production bundles' LoRA config (tower only, v0001 here), not the
    # config's: one config per backbone, so the new domain is served beside them
    late = tmp_path / "late"  # the held-out domain's logs under a name no test uses
    for split in ("train", "val", "test"):
        t = ds.dataset(str(world["logs"] / "heldout" / "d05" / split), format="parquet", partitioning="hive").to_table()
        (late / split).mkdir(parents=True)
        pq.write_table(t.set_column(t.schema.get_field_index("domain"), "domain", pa.array(["late"] * t.num_rows)),
                       late / split / "part-0.parquet")
    assert add_domain(cfg, "late", str(late))["bundles"]["late"]["promoted"]
    assert read_manifest(str(reg / "adapters" / "late" / "v0001"))["lora"]["wide"] == []
    held = pq.read_table(late / "test" / "part-0.parquet")
    scorer = Scorer(str(reg), "ctr")  # every production bundle, "late" with them: one config on the backbone
    probs, slots = scorer.score(held)
    assert (slots == scorer.slot["late"]).all() and np.isfinite(probs).all()
