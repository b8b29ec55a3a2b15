"""4 ``mdlora add-domain`` processes at once against one registry, on one local Ray cluster.

Ray Train faults in pretraining are tested elsewhere: a worker SIGKILLed between checkpoints
(resume, 2 -> 1 reshard) in ``tests/integration/test_pretrain.py``; ``benchmarks/reliability.py``
repeats that kill at several steps (AUC against an undisturbed run) and kills rank 0 inside a
checkpoint write (``MDLORA_FAULT_WRITE``), which costs minutes of Ray start-ups per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import ROOT, sets

pytestmark = pytest.mark.integration

NEW_DOMAINS = ["d10", "d11", "d12", "d13"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray (4 logical CPUs on the 2 cores, so that 4 one-worker jobs run at once)."""
    import ray

    ctx = ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def new_domains(tiny_logs, tmp_path_factory) -> dict[str, Path]:
    """One log dir (train/, val/) per new domain: the held-out d03 rows relabelled d10..d13."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("new-domains")
    out = {}
    for d in NEW_DOMAINS:
        for split in ("train", "val"):
            t = ds.dataset(str(tiny_logs / "heldout" / "d03" / split), format="parquet",
                           partitioning="hive").to_table()
            t = t.set_column(t.schema.get_field_index("domain"), "domain", pa.array([d] * t.num_rows))
            (base / d / split).mkdir(parents=True)
            pq.write_table(t, base / d / split / "part-0.parquet")
        out[d] = base / d
    return out


def test_four_add_domain_jobs_at_once(world, new_domains, cluster, tmp_path):
    """Every job publishes and promotes its own v0001; nothing else in the registry changes."""
    import shutil

    from mdlora.atomic import sha256_tree
    from mdlora.infra.artifacts.registry import Registry
    from mdlora.infra.storage import open_fs

    reg_root = tmp_path / "registry"
    shutil.copytree(world["root"], reg_root)
    d00_before = sha256_tree(reg_root / "adapters" / "d00")[0]
    backbone_before = sha256_tree(reg_root / "backbones")[0]
    config = tmp_path / "adapt.yaml"
    config.write_text("{}\n")
    over = [f"output.root={reg_root}", "output.model=ctr", "data.batch_size=1024", "lora.alpha=4",
            "loop.epochs=2", "loop.patience=1", "train.tasks=1", "dist.world_size=1", "dist.max_failures=0"]
    env = {**os.environ, "RAY_ADDRESS": cluster}
    procs = {d: subprocess.Popen(
        [sys.executable, "-m", "mdlora.jobs.cli", "add-domain", "--config", str(config), "--domain", d,
         "--data", str(new_domains[d]), "--json", *sets(over)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in NEW_DOMAINS}
    try:
        results = {d: p.communicate(timeout=400) for d, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for d, p in procs.items():
        assert p.returncode == 0, (d, results[d][1][-3000:])

    reg = Registry(*open_fs(str(reg_root)))
    assert reg.names("adapters") == ["d00", *NEW_DOMAINS]
    for d in NEW_DOMAINS:
        out = results[d][0]
        printed = json.loads(out[out.index("{\n"):])["bundles"]  # after any Ray driver log lines
        assert list(printed) == [d] and printed[d]["version"] == "v0001"
        assert reg.versions("adapters", d) == ["v0001"] and reg.verify("adapters", d, "v0001") == []
        assert reg.aliases("adapters", d) == {"latest": "v0001", "production": "v0001"}
        assert [e["event"] for e in reg.history("adapters", d)] == ["publish", "promote"]
        assert reg.manifest("adapters", d)["domain"] == d
    assert sha256_tree(reg_root / "backbones")[0] == backbone_before  # the backbone is untouched
    assert sha256_tree(reg_root / "adapters" / "d00")[0] == d00_before  # and so is every other domain
    from mlflow.tracking import MlflowClient  # the four opened one new tracking store together

    client = MlflowClient(f"sqlite:///{reg_root}/tracking/mlflow.db")
    runs = {d: r for r in client.search_runs([client.get_experiment_by_name("mdlora-ctr").experiment_id])
            for d in NEW_DOMAINS if r.data.tags.get(f"mdlora.adapter.{d}.version") == "v0001"}
    assert sorted(runs) == sorted(NEW_DOMAINS) and {r.info.status for r in runs.values()} == {"FINISHED"}
