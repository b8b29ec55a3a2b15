"""Scheduled retrain on two consecutive windows (real Ray, synthetic logs): the gate, an added
domain rebased on its own logs, idempotency, runs killed at two points and one that fails, two
retrains at once, warm start, and scoring after a partial promotion.

Window 1 is run four times: killed (SIGKILL, no clean-up) right after it published its backbone,
killed again while publishing its adapters, failed before the gate, and then to the end; each
attempt must reuse what the ones before it published. Window 2 is started while a second
retrain of the same window is tried at once: the lock refuses that one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mdlora.atomic import sha256_file, sha256_tree
from mdlora.infra.artifacts.bundle import BundleError, load_bundle
from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.artifacts.sealed import read_manifest
from mdlora.infra.pretrain import pretrain
from mdlora.infra.score import Scorer
from mdlora.infra.storage import open_fs
from mdlora.infra.synth import generate
from mdlora.jobs.cli import main
from mdlora.trainer.config import load_adapt_config, load_retrain_config, load_run_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
W0, W1, W2 = "2026-01-01..2026-01-01", "2026-01-02..2026-01-02", "2026-01-03..2026-01-03"
BAD = "d02"  # its window-2 training labels are flipped: its challenger must lose the gate
SMALL = "d03"  # ~2 % of rows (a noisy gate): left out of the rebase by adapt.data.domains
ADDED = "d04"  # held out of the schema: added with add-domain after window 0, rebased on its own logs
W1_RUN = "2026-01-02_2026-01-02-"  # the start of window 1's run key (record dir, Ray Train run name)


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


def _retrain_process(cluster: str, config: Path, window: str, **env: str) -> subprocess.CompletedProcess:
    """``mdlora retrain`` in its own process on the test's Ray cluster (so a SIGKILL is a real one)."""
    argv = [sys.executable, "-m", "mdlora.jobs.cli", "retrain", "--config", str(config), "--window", window]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": cluster, **env})


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("retrain")
    logs, reg = base / "logs", base / "reg"
    generate(str(logs), rows=60_000, domains=5, holdout_domains=1, seed=11, users=300, items=300, days=3)
    for split in ("train", "val"):  # window 2: the bad domain's labels flipped
        f = logs / split / "date=2026-01-03" / "part-00000.parquet"
        t = pq.read_table(f)
        bad = pc.equal(t.column("domain"), BAD)
        click = t.column("click")
        flipped = pc.if_else(bad, pc.subtract(pa.scalar(1, click.type), click), click)
        pq.write_table(t.set_column(t.schema.get_field_index("click"), "click", flipped), f)
    data = [f"data.schema={logs}/schema.yaml", f"data.train={logs}/train", f"data.val={logs}/val"]
    # window 0: a bare pretrain is production; then ADDED gets an adapter (add-domain)
    pretrain(load_run_config(None, data + [f"output.root={reg}", "output.model=ctr", f"data.window={W0}",
                                           "data.batch_size=512", "loop.epochs=2", "loop.log_every=0",
                                           "model.hidden=[32,16]", "dist.max_failures=0"]))
    from mdlora.infra.adapt import add_domain

    add_domain(load_adapt_config(None, data + [f"output.root={reg}", "output.model=ctr", "lora.alpha=4",
                                               "train.batch_size=64", "train.lr=0.03", "loop.epochs=4",
                                               "loop.patience=1", "dist.max_failures=0"]),
               ADDED, str(logs / "heldout" / ADDED))
    config = base / "retrain.yaml"
    config.write_text(
        f"pretrain: {{data: {{schema: {logs}/schema.yaml, train: {logs}/train, val: {logs}/val, batch_size: 512}},"
        f" loop: {{epochs: 2, log_every: 0}}, dist: {{max_failures: 0}}, output: {{root: {reg}, model: ctr}}}}\n"
        f"adapt: {{data: {{domains: [d00, d01, {BAD}, {ADDED}]}}, lora: {{alpha: 4}},"
        " train: {batch_size: 64, lr: 0.03}, loop: {epochs: 4, patience: 1}, dist: {max_failures: 0}}\n"
        f"gate: {{holdout: {logs}/test, tolerance: 0.02}}\n")
    cfg = load_retrain_config(str(config))
    registry = Registry(*open_fs(str(reg)))
    versions = lambda: {n: registry.versions(k, n) for k in ("backbones", "adapters") for n in registry.names(k)}  # noqa: E731
    w = {"base": base, "logs": logs, "reg": reg, "config": config, "registry": registry, "prod0": _production(registry)}

    # window 1, attempt 1: killed just after publishing its backbone, before recording it
    w["kill1"] = _retrain_process(ray_local, config, W1, MDLORA_FAULT_WRITE=f"/retrain/ctr/{W1_RUN}")
    w["prod_kill1"], w["versions_kill1"] = _production(registry), versions()
    # attempt 2: killed while publishing its adapters (d00 is in, d01's manifest is not)
    w["kill2"] = _retrain_process(ray_local, config, W1, MDLORA_FAULT_WRITE="adapters/d01/v0001/manifest.json")
    w["prod_kill2"], w["versions_kill2"] = _production(registry), versions()
    # attempt 3: fails after training, before the gate decides
    with pytest.MonkeyPatch.context() as mp:
        import mdlora.infra.retrain

        def boom(*a, **k):
            raise RuntimeError("injected failure in the gate")

        mp.setattr(mdlora.infra.retrain, "evaluate", boom)
        with pytest.raises(RuntimeError, match="injected"):
            mdlora.infra.retrain.retrain(cfg, W1)
    w["prod_failed"], w["versions_failed"] = _production(registry), versions()
    w["r1"] = main(["retrain", "--config", str(config), "--window", W1, "--json"])  # resumes and finishes
    w["versions1"], w["tree1"] = versions(), _tree(reg)
    w["r1_again"] = main(["retrain", "--config", str(config), "--window", W1])  # done: returns the report
    w["tree1_again"], w["prod1"] = _tree(reg), _production(registry)

    # window 2, and a second retrain of the same model started (in its own process) while it runs
    lock = reg / "retrain" / "ctr" / ".lock"

    def second() -> None:
        deadline = time.monotonic() + 300
        while not (lock.exists() and f'"pid": {os.getpid()}' in lock.read_text() and W2 in lock.read_text()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        w["second"] = _retrain_process(ray_local, config, W2)
        w["second_done_while_first_ran"] = not w.get("r2")

    refused = threading.Thread(target=second, daemon=True)
    refused.start()
    w["r2"] = mdlora.infra.retrain.retrain(cfg, W2)
    refused.join(300)
    w["versions2"] = versions()
    yield w
    shutil.rmtree(base, ignore_errors=True)


def test_a_retrain_killed_after_publishing_its_backbone_takes_it_up_again(world):
    assert world["kill1"].returncode == -signal.SIGKILL, world["kill1"].stderr[-3000:]
    assert world["versions_kill1"] == {"ctr": ["v0001", "v0002"], ADDED: ["v0001"]}  # published, unrecorded
    assert world["prod_kill1"] == world["prod0"]
    assert world["versions_kill2"]["ctr"] == ["v0001", "v0002"]  # attempt 2 found it: no second backbone
    run = read_manifest(str(world["reg"] / "backbones" / "ctr" / "v0002"))["run"]
    assert run.startswith(f"retrain-ctr-{W1_RUN}")


def test_a_retrain_killed_while_publishing_adapters_reuses_what_it_published(world):
    assert world["kill2"].returncode == -signal.SIGKILL, world["kill2"].stderr[-3000:]
    assert world["versions_kill2"] == {"ctr": ["v0001", "v0002"], "d00": ["v0001"], ADDED: ["v0001"]}
    assert (world["reg"] / "adapters" / "d01" / "v0001").is_dir()  # claimed, never completed: invisible
    assert world["prod_kill2"] == world["prod0"]
    v = world["versions_failed"]
    assert v["d00"] == ["v0001"]  # reused by attempt 3, not trained and published again
    assert v["d01"] == ["v0002"]  # a dead publisher's number is never reused


def test_a_failed_run_leaves_production_untouched_and_its_rerun_reuses_its_versions(world):
    assert world["prod_failed"] == world["prod0"] == {"backbones/ctr": "v0001", f"adapters/{ADDED}": "v0001"}
    assert world["versions_failed"] == {"ctr": ["v0001", "v0002"], "d00": ["v0001"], "d01": ["v0002"],
                                        BAD: ["v0001"], ADDED: ["v0001", "v0002"]}  # published, latest only
    assert world["versions1"] == world["versions_failed"]  # the last attempt resumed: no duplicate versions
    run = read_manifest(str(world["reg"] / "backbones" / "ctr" / "v0002"))["run"]
    for d, v in (("d00", "v0001"), ("d01", "v0002"), (BAD, "v0001"), (ADDED, "v0002")):
        assert read_manifest(str(world["reg"] / "adapters" / d / v))["run"] == run  # what the run published


def _expected(report: dict) -> dict[str, str]:
    """What the gate's rule says of each domain: promote iff challenger AUC >= champion AUC - tol."""
    tol = report["gate"]["tolerance"]
    return {d: ("promote" if r["challenger"]["adapter"] and r["challenger"]["rows"]
                and r["challenger"]["auc"] >= r["champion"]["auc"] - tol else "keep")
            for d, r in report["domains"].items()}


def test_window1_promotes_the_rebased_domains_and_a_rerun_creates_nothing(world):
    assert world["r1"] == 0 and world["r1_again"] == 0
    run = next(p for p in (world["reg"] / "retrain" / "ctr").iterdir() if p.name.startswith(W1_RUN))
    report = json.loads((run / "report.json").read_text())
    assert "| domain |" in (run / "report.md").read_text()
    assert report["champion"]["version"] == "v0001" and report["backbone"]["version"] == "v0002"
    reasons = {d: r["reason"] for d, r in report["domains"].items()}
    assert {"d00", "d01", BAD} <= set(report["promoted"]), reasons
    assert {d: r["decision"] for d, r in report["domains"].items()} == _expected(report), reasons
    assert report["domains"][SMALL]["decision"] == "keep" and "not rebased" in report["domains"][SMALL]["reason"]
    added = report["domains"][ADDED]["decision"] == "promote"
    assert world["prod1"] == ({"backbones/ctr": "v0002"} | {f"adapters/{d}": v for d, v in
                              (("d00", "v0001"), ("d01", "v0002"), (BAD, "v0001"))}
                              | {f"adapters/{ADDED}": "v0002" if added else "v0001"})
    for d in ("d00", "d01", BAD):  # champion: the production backbone alone; the new bundles pin the new one
        champion = report["domains"][d]["champion"]
        assert (champion["adapter"], champion["backbone"]) == (None, "v0001")
        version = report["domains"][d]["challenger"]["adapter"]
        assert read_manifest(str(world["reg"] / "adapters" / d / version))["backbone"]["version"] == "v0002"
    assert json.loads((world["reg"] / "backbones" / "ctr" / "v0002" / "config.json").read_text())[
        "model"]["init_from"] == "v0001"  # warm start recorded
    assert world["tree1_again"] == world["tree1"]  # the rerun of a finished window published nothing
    from mdlora.infra.retrain import retrain

    assert retrain(load_retrain_config(str(world["config"])), W1) == report | {"rerun": True}


def test_an_added_domain_is_rebased_on_its_own_logs_and_gated_on_its_own_test_split(world):
    report = world["r2"]
    r1 = json.loads(next((world["reg"] / "retrain" / "ctr").glob(f"{W1_RUN}*/report.json")).read_text())
    own = world["logs"] / "heldout" / ADDED
    for rep, backbone in ((r1, "v0002"), (report, "v0003")):
        r = rep["domains"][ADDED]
        assert r["challenger"]["backbone"] == backbone and r["challenger"]["adapter"], r
        assert r["holdout"] == str(own / "test") and r["challenger"]["rows"] == r["champion"]["rows"] > 0
        assert r["challenger"]["auc"] is not None and r["champion"]["auc"] is not None
        manifest = read_manifest(str(world["reg"] / "adapters" / ADDED / r["challenger"]["adapter"]))
        assert manifest["backbone"]["version"] == backbone and manifest["run"].startswith("retrain-ctr-")
        assert manifest["data_window"]["train"] == str(own / "train")
        assert manifest["data_window"]["window"] == rep["window"]  # trained on the window only
    champion = r1["domains"][ADDED]["champion"]
    assert (champion["adapter"], champion["backbone"]) == ("v0001", "v0001")  # add-domain's bundle
    md = next((world["reg"] / "retrain" / "ctr").glob(f"{W1_RUN}*/report.md")).read_text()
    assert f"- {ADDED}: `{own / 'test'}`" in md


def test_window2_keeps_the_worse_domain_on_its_old_backbone(world):
    r2, reg = world["r2"], world["registry"]
    print("window 2 gate:", {d: r["reason"] for d, r in r2["domains"].items()})
    assert r2["backbone"]["version"] == "v0003" and r2["champion"]["version"] == "v0002"
    bad = r2["domains"][BAD]
    assert bad["decision"] == "keep", bad
    assert bad["challenger"]["auc"] < bad["champion"]["auc"] - r2["gate"]["tolerance"]
    assert {"d00", "d01"} <= set(r2["promoted"]) and BAD not in r2["promoted"]
    assert {d: r["decision"] for d, r in r2["domains"].items()} == _expected(r2)
    production = _production(reg)
    assert production["backbones/ctr"] == "v0003" and production[f"adapters/{BAD}"] == "v0001"
    for d in ("d00", "d01"):
        assert production[f"adapters/{d}"] == r2["domains"][d]["challenger"]["adapter"]
    # the kept bundle pins the old backbone and is refused on the new one
    path = reg.fetch("adapters", BAD, "production", world["base"])
    assert read_manifest(str(path))["backbone"]["version"] == "v0002"
    new_hash = read_manifest(str(world["reg"] / "backbones" / "ctr" / "v0003"))["content_hash"]
    with pytest.raises(BundleError, match="backbone"):
        load_bundle(path, expect_backbone_hash=new_hash, expect_schema_hash=None)


def test_a_second_retrain_at_once_is_refused_by_the_lock(world):
    second = world["second"]
    assert world["second_done_while_first_ran"]  # it really ran while the first held the lock
    assert second.returncode == 3, second.stderr[-3000:]
    assert "another retrain of this model is running" in second.stderr and W2 in second.stderr
    assert world["versions2"]["ctr"] == ["v0001", "v0002", "v0003"]  # one window-2 backbone, not two


def test_scoring_after_a_partial_promotion_routes_each_domain_to_its_pinned_backbone(world, tmp_path):
    r2 = world["r2"]
    scorer = Scorer(str(world["reg"]), "ctr")
    chosen = {d: (r["challenger"] if r["decision"] == "promote" else r["champion"])
              for d, r in r2["domains"].items() if d != SMALL}
    assert scorer.backbone_of == {d: c["backbone"] for d, c in chosen.items()}
    assert scorer.backbone_of[BAD] == "v0002" and scorer.backbone_of["d00"] == "v0003"
    summary = scorer.score_dataset(r2["gate"]["holdout"], str(tmp_path / "preds.parquet"))
    assert summary["fallback_rows"] == summary["domains"][SMALL]["rows"] > 0  # no bundle: production backbone
    assert summary["domains"][SMALL]["backbone_version"] == "v0003"
    for d in ("d00", "d01", BAD):  # production now scores exactly what the gate chose
        assert summary["domains"][d]["backbone_version"] == chosen[d]["backbone"]
        assert summary["domains"][d]["auc"] == pytest.approx(chosen[d]["auc"], abs=1e-12)
    preds = pq.read_table(tmp_path / "preds.parquet")
    rows = pc.equal(preds.column("domain"), BAD)
    assert set(preds.filter(rows).column("backbone_version").to_pylist()) == {"v0002"}


def test_warm_start_starts_from_the_production_weights(world, tmp_path):
    """A warm-started run whose steps barely move the weights publishes (almost) the weights of
    the backbone it started from, and those are far from a fresh initialisation."""
    import torch

    from mdlora.embeddings.schema import Schema
    from mdlora.embeddings.tables import build_ebc
    from mdlora.trainer.backbone import build_backbone
    from mdlora.trainer.config import ModelConfig
    from mdlora.trainer.recipes import load_unsharded

    root = tmp_path / "reg"
    shutil.copytree(world["reg"] / "backbones", root / "backbones")
    logs = world["logs"]
    out = pretrain(load_run_config(None, [
        f"data.schema={logs}/schema.yaml", f"data.train={logs}/train", f"data.val={logs}/val", f"data.window={W1}",
        f"output.root={root}", "output.model=ctr", "data.batch_size=512", "loop.max_steps=2", "loop.log_every=0",
        "model.hidden=[32,16]", "model.init_from=v0002", "optim.dense_lr=1e-9", "optim.sparse_lr=1e-9",
        "dist.world_size=1", "dist.max_failures=0"]))
    schema = Schema.load(logs / "schema.yaml")
    model = ModelConfig(hidden=[32, 16])
    start = load_unsharded(root / "backbones" / "ctr" / "v0002", schema, model).backbone.state_dict()
    warm = load_unsharded(Path(out["path"]), schema, model).backbone.state_dict()
    torch.manual_seed(0)
    fresh = build_backbone(schema, model, build_ebc(schema, device="cpu")).state_dict()
    assert set(warm) == set(start) == set(fresh)
    assert max((warm[k] - start[k]).abs().max().item() for k in start) < 1e-6
    assert max((fresh[k] - start[k]).abs().max().item() for k in start) > 1e-2  # a cold start is far off


def test_a_missing_holdout_fails_before_anything_is_published(world):
    before = _tree(world["reg"])
    cfg = load_retrain_config(str(world["config"]), [f"gate.holdout={world['base']}/nope"])
    from mdlora.infra.retrain import retrain

    with pytest.raises(FileNotFoundError, match="gate.holdout"):
        retrain(cfg, W2)
    assert _tree(world["reg"]) == before


def test_a_corrupt_champion_bundle_stops_the_retrain_before_it_trains(world, tmp_path):
    """Every bundle the gate will score as champion is checked first: a corrupt one is named
    before any backbone or adapter is trained or published (no Ray job starts)."""
    reg = tmp_path / "reg"
    shutil.copytree(world["reg"], reg)
    registry = Registry(*open_fs(str(reg)))
    weights = Path(registry.resolve("adapters", "d00", "production")) / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = _tree(reg)
    cfg = load_retrain_config(str(world["config"]), [f"pretrain.output.root={reg}"])
    from mdlora.infra.retrain import retrain

    with pytest.raises(ValueError, match=r"adapters/d00 v\d{4} is corrupt: .*adapter.safetensors: sha256 mismatch"):
        retrain(cfg, "2026-01-02..2026-01-03")  # a window no run has recorded yet
    assert _tree(reg) == before  # no backbone, no bundle, no run record


NOISE = ("Successfully loaded", "PreemptionWatcher", "is_fx_tracing")  # third-party lines silenced at source


def test_every_job_is_tracked_in_one_experiment_and_the_cli_output_holds_no_library_noise(world):
    from mlflow.tracking import MlflowClient

    from tests.infra.test_tracking import read_events

    for attempt in ("kill1", "kill2"):  # `mdlora retrain` processes: Ray Train pretrain and adapt workers
        out = world[attempt].stdout + world[attempt].stderr
        assert "(TrainController pid=" in out and not [n for n in NOISE if n in out], out[-3000:]  # workers' lines too
    client = MlflowClient(f"sqlite:///{world['reg']}/tracking/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mdlora-ctr").experiment_id], max_results=100)
    by = lambda job, **tags: [r for r in runs if r.data.tags["mdlora.job"] == job  # noqa: E731
                              and all(r.data.tags.get(f"mdlora.{k}") == v for k, v in tags.items())]
    (bare,) = by("pretrain", data_window=W0)  # window 0's pretrain: config, per-evaluation per-domain AUC
    manifest = read_manifest(str(world["reg"] / "backbones" / "ctr" / "v0001"))
    assert bare.info.status == "FINISHED" and bare.data.params["loop.epochs"] == "2"
    assert bare.data.tags["mdlora.backbone_hash"] == manifest["content_hash"]
    assert bare.data.tags["mdlora.registry"] == str(world["reg"] / "backbones" / "ctr" / "v0001")
    auc = [(m.step, m.value) for m in client.get_metric_history(bare.info.run_id, "val/d00/auc")]
    assert len(auc) == 2 and auc[0][0] < auc[1][0] and all(0.5 < v < 1 for _, v in auc), auc
    events = read_events(world["reg"] / "tracking" / "tensorboard" / "mdlora-ctr" / bare.info.run_name)
    assert [s for s, _ in events["val/d00/auc"]] == [s for s, _ in auc]
    (added,) = by("add-domain")
    assert added.data.tags[f"mdlora.adapter.{ADDED}.version"] == "v0001"
    assert client.get_metric_history(added.info.run_id, f"val/{ADDED}/score")
    assert added.data.metrics[f"adapter/{ADDED}/param_count"] > 0

    (w1,) = [r for r in by("retrain", data_window=W1) if r.info.status == "FINISHED"]
    key = w1.data.tags["mdlora.run_key"]
    assert key.startswith(f"retrain-ctr-{W1_RUN}") and by("retrain", data_window=W1, run_key=key)
    assert {r.info.status for r in by("retrain", data_window=W1)} >= {"FAILED", "FINISHED"}  # attempt 3 failed
    assert by("pretrain", run_key=key) and by("adapt", run_key=key)  # its stages, in the same experiment
    table = Path(client.download_artifacts(w1.info.run_id, "retrain_report.md", str(world["base"] / "dl"))).read_text()
    assert "| d00 |" in table and w1.data.metrics["gate/d00/promoted"] == 1.0
    assert 0.5 < w1.data.metrics["gate/d00/challenger_auc"] <= 1 and "gate/d00/champion_auc" in w1.data.metrics
    assert w1.data.tags["mdlora.backbone_version"] == "v0002" and w1.data.tags["mdlora.champion_version"] == "v0001"
