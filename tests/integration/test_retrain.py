"""Scheduled retrain on two consecutive windows (real Ray, synthetic logs): gate, idempotency,
a failure that leaves production untouched, and scoring after a partial promotion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from adapters.bundle import BundleError, load_bundle
from adapters.registry import Registry
from infra.pretrain import pretrain
from infra.score import Scorer
from infra.storage import open_fs
from infra.synth import generate
from jobs.cli import main
from mdlora.artifact import read_manifest
from mdlora.atomic import sha256_file, sha256_tree
from trainer.config import load_retrain_config, load_run_config

pytestmark = pytest.mark.integration
W0, W1, W2 = "2026-01-01..2026-01-01", "2026-01-02..2026-01-02", "2026-01-03..2026-01-03"
BAD = "d02"  # its window-2 training labels are flipped: its challenger must lose the gate
SMALL = "d03"  # 1 % of rows (~60 holdout rows, too noisy for a gate): left out of the rebase


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every version dir and alias file of the registry (relative path -> hash)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir() and p.name.startswith("v0"):
            out[str(p.relative_to(root))] = sha256_tree(p)[0]
        elif p.name == "aliases.json":
            out[str(p.relative_to(root))] = sha256_file(p)
    return out


def _production(reg: Registry) -> dict[str, str]:
    return {f"{k}/{n}": v for k in ("backbones", "adapters") for n in reg.names(k)
            if (v := reg.aliases(k, n).get("production"))}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("retrain")
    logs, reg = base / "logs", base / "reg"
    generate(str(logs), rows=60_000, domains=4, seed=11, users=300, items=300, days=3)
    for split in ("train", "val"):  # window 2: the bad domain's labels flipped
        f = logs / split / "date=2026-01-03" / "part-00000.parquet"
        t = pq.read_table(f)
        bad = pc.equal(t.column("domain"), BAD)
        click = t.column("click")
        flipped = pc.if_else(bad, pc.subtract(pa.scalar(1, click.type), click), click)
        pq.write_table(t.set_column(t.schema.get_field_index("click"), "click", flipped), f)
    data = [f"data.schema={logs}/schema.yaml", f"data.train={logs}/train", f"data.val={logs}/val"]
    # window 0: a bare pretrain (2 workers) is production; no domain has an adapter yet
    pretrain(load_run_config(None, data + [f"output.root={reg}", "output.model=ctr", f"data.window={W0}",
                                           "data.batch_size=512", "loop.epochs=2", "loop.log_every=0",
                                           "model.hidden=[32,16]", "dist.world_size=2", "dist.max_failures=0"]))
    config = base / "retrain.yaml"
    config.write_text(
        f"pretrain: {{data: {{schema: {logs}/schema.yaml, train: {logs}/train, val: {logs}/val, batch_size: 512}},"
        f" loop: {{epochs: 2, log_every: 0}}, dist: {{max_failures: 0}}, output: {{root: {reg}, model: ctr}}}}\n"
        f"adapt: {{data: {{domains: [d00, d01, {BAD}]}}, lora: {{alpha: 4}}, train: {{batch_size: 64, lr: 0.03}},"
        " loop: {epochs: 4, patience: 1}, dist: {max_failures: 0}}\n"
        f"gate: {{holdout: {logs}/test, tolerance: 0.02}}\n")
    cfg = load_retrain_config(str(config))
    registry = Registry(*open_fs(str(reg)))
    versions = lambda: {n: registry.versions(k, n) for k in ("backbones", "adapters") for n in registry.names(k)}  # noqa: E731
    w = {"base": base, "reg": reg, "config": config, "registry": registry, "prod0": _production(registry)}
    with pytest.MonkeyPatch.context() as mp:  # window 1 fails after training, before the gate decides
        import infra.retrain

        def boom(*a, **k):
            raise RuntimeError("injected failure in the gate")

        mp.setattr(infra.retrain, "evaluate", boom)
        with pytest.raises(RuntimeError, match="injected"):
            infra.retrain.retrain(cfg, W1)
    w["prod_failed"], w["versions_failed"] = _production(registry), versions()
    w["r1"] = main(["retrain", "--config", str(config), "--window", W1, "--json"])  # resumes the failed run
    w["versions1"], w["tree1"] = versions(), _tree(reg)
    w["r1_again"] = main(["retrain", "--config", str(config), "--window", W1])  # done: returns the report
    w["tree1_again"], w["prod1"] = _tree(reg), _production(registry)
    w["r2"] = infra.retrain.retrain(cfg, W2)
    yield w
    shutil.rmtree(base, ignore_errors=True)


def test_a_failed_run_leaves_production_untouched_and_its_rerun_reuses_its_versions(world):
    assert world["prod_failed"] == world["prod0"] == {"backbones/ctr": "v0001"}  # no alias moved
    assert world["versions_failed"] == {"ctr": ["v0001", "v0002"], "d00": ["v0001"], "d01": ["v0001"],
                                        BAD: ["v0001"]}  # it had published (latest only)
    assert world["versions1"] == world["versions_failed"]  # the rerun resumed: no duplicate versions


def test_window1_promotes_the_rebased_domains_and_a_rerun_creates_nothing(world):
    assert world["r1"] == 0 and world["r1_again"] == 0
    run = next(p for p in (world["reg"] / "retrain" / "ctr").iterdir() if p.name.startswith("2026-01-02"))
    report = json.loads((run / "report.json").read_text())
    assert "| domain |" in (run / "report.md").read_text()
    assert report["champion"]["version"] == "v0001" and report["backbone"]["version"] == "v0002"
    assert report["promoted"] == ["d00", "d01", BAD], {d: r["reason"] for d, r in report["domains"].items()}
    assert report["domains"][SMALL]["decision"] == "keep" and "not rebased" in report["domains"][SMALL]["reason"]
    assert world["prod1"] == {"backbones/ctr": "v0002"} | {f"adapters/{d}": "v0001" for d in ("d00", "d01", BAD)}
    for d in report["promoted"]:  # champion: the production backbone alone; the new bundles pin the new one
        champion = report["domains"][d]["champion"]
        assert (champion["adapter"], champion["backbone"]) == (None, "v0001")
        assert read_manifest(str(world["reg"] / "adapters" / d / "v0001"))["backbone"]["version"] == "v0002"
    assert json.loads((world["reg"] / "backbones" / "ctr" / "v0002" / "config.json").read_text())[
        "model"]["init_from"] == "v0001"  # warm start recorded
    assert world["tree1_again"] == world["tree1"]  # the rerun of a finished window published nothing
    from infra.retrain import retrain

    assert retrain(load_retrain_config(str(world["config"])), W1) == report | {"rerun": True}


def test_window2_keeps_the_worse_domain_on_its_old_backbone(world):
    r2, reg = world["r2"], world["registry"]
    print("window 2 gate:", {d: r["reason"] for d, r in r2["domains"].items()})
    assert r2["backbone"]["version"] == "v0003" and r2["champion"]["version"] == "v0002"
    bad = r2["domains"][BAD]
    assert bad["decision"] == "keep", bad
    assert bad["challenger"]["auc"] < bad["champion"]["auc"] - r2["gate"]["tolerance"]
    assert r2["promoted"] == ["d00", "d01"], {d: r["reason"] for d, r in r2["domains"].items()}
    assert _production(reg) == {"backbones/ctr": "v0003", f"adapters/{BAD}": "v0001", "adapters/d00": "v0002",
                                "adapters/d01": "v0002"}
    # the kept bundle pins the old backbone and is refused on the new one
    path = reg.fetch("adapters", BAD, "production", world["base"])
    assert read_manifest(str(path))["backbone"]["version"] == "v0002"
    new_hash = read_manifest(str(world["reg"] / "backbones" / "ctr" / "v0003"))["content_hash"]
    with pytest.raises(BundleError, match="backbone"):
        load_bundle(path, expect_backbone_hash=new_hash, expect_schema_hash=None)


def test_scoring_after_a_partial_promotion_routes_each_domain_to_its_pinned_backbone(world, tmp_path):
    r2 = world["r2"]
    scorer = Scorer(str(world["reg"]), "ctr")
    assert scorer.backbone_of == {"d00": "v0003", "d01": "v0003", BAD: "v0002"}
    summary = scorer.score_dataset(r2["gate"]["holdout"], str(tmp_path / "preds.parquet"))
    assert summary["fallback_rows"] == summary["domains"][SMALL]["rows"] > 0  # no bundle: production backbone
    assert summary["domains"][SMALL]["backbone_version"] == "v0003"
    for d in ("d00", "d01", BAD):  # production now scores exactly what the gate chose
        r = r2["domains"][d]
        chosen = r["challenger"] if r["decision"] == "promote" else r["champion"]
        assert summary["domains"][d]["backbone_version"] == chosen["backbone"]
        assert summary["domains"][d]["auc"] == pytest.approx(chosen["auc"], abs=1e-12)
    preds = pq.read_table(tmp_path / "preds.parquet")
    rows = pc.equal(preds.column("domain"), BAD)
    assert set(preds.filter(rows).column("backbone_version").to_pylist()) == {"v0002"}


def test_a_missing_holdout_fails_before_anything_is_published(world):
    before = _tree(world["reg"])
    cfg = load_retrain_config(str(world["config"]), [f"gate.holdout={world['base']}/nope"])
    from infra.retrain import retrain

    with pytest.raises(FileNotFoundError, match="gate.holdout"):
        retrain(cfg, W2)
    assert _tree(world["reg"]) == before
