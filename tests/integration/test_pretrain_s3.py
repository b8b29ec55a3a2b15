"""`mdlora pretrain` and `mdlora retrain` with logs, Ray checkpoints, the registry and the retrain
lock all on S3 (moto).

Ray workers read S3 credentials from their own environment (as on a cluster: IAM role, or
variables set when the nodes start), so the environment is set before the local Ray starts.
The secret key must appear in nothing the runs print, write (S3 objects, local caches) or log
(Ray's session logs).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.integration.test_pretrain import run_config

pytestmark = pytest.mark.integration
SECRET = "testing-secret-SENTINEL-do-not-log"


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    import ray
    import s3fs

    env = {"MDLORA_S3_ENDPOINT": s3_server, "AWS_ACCESS_KEY_ID": "testing-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = f"mdlora-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                      client_kwargs={"endpoint_url": s3_server, "region_name": "us-east-1"}
                      ).call_s3("create_bucket", Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    ctx = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield {"uri": f"s3://{bucket}", "session": Path(ctx.address_info["session_dir"])}
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def published(s3_ray, tmp_path_factory):
    """Logs on S3 and a backbone pretrained from them into a registry on S3."""
    from infra.pretrain import pretrain
    from infra.synth import generate

    uri = s3_ray["uri"]
    generate(f"{uri}/logs", rows=12_000, domains=3, seed=4, users=2000, items=2000, days=2)
    logs = tmp_path_factory.mktemp("unused")
    cfg = run_config(logs, logs, epochs=1, checkpoint_every=0)
    for k in ("schema", "train", "val"):
        setattr(cfg.data, k, getattr(cfg.data, k).replace(str(logs), f"{uri}/logs"))
    cfg.dist.world_size = 1
    cfg.output.root = f"{uri}/registry"
    return cfg, pretrain(cfg, run_name="s3-test")


def test_pretrain_from_s3_to_s3(s3_ray, published):
    from infra.storage import open_fs

    uri = s3_ray["uri"]
    fs, bucket = open_fs(uri)
    _, summary = published
    assert summary["path"] == f"{uri}/registry/backbones/ctr/v0001"
    path = summary["path"][len("s3://"):]
    manifest = json.loads(fs.cat(f"{path}/manifest.json"))
    assert manifest["content_hash"] == summary["content_hash"] and manifest["run"] == "s3-test"
    assert {"plan.json", "train_state.json", ".metadata", "__0_0.distcp"} <= set(manifest["files"])
    # Ray persisted its checkpoints to S3 too (output.run_dir defaults to <root>/runs)
    assert fs.ls(f"{bucket}/registry/runs/s3-test")
    assert summary["metrics"]["wauc"] > 0.55


def test_retrain_on_an_s3_registry_and_no_secret_anywhere(s3_ray, published, tmp_path, capfd):
    """A scheduled retrain with everything on S3: the lease lock is taken and released, the run
    record and report land in S3, the gate promotes, a rerun creates nothing."""
    import yaml

    from adapters.registry import Registry
    from infra.pretrain import cache_dir
    from infra.storage import open_fs
    from jobs.cli import main

    uri = s3_ray["uri"]
    fs, bucket = open_fs(uri)
    cfg, _ = published
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "pretrain": {"data": {"schema": cfg.data.schema, "train": cfg.data.train, "val": cfg.data.val,
                              "batch_size": 512},
                     "loop": {"epochs": 1, "log_every": 0}, "dist": {"world_size": 1, "max_failures": 0},
                     "output": {"root": f"{uri}/registry", "model": "ctr"}},
        "adapt": {"lora": {"alpha": 4}, "loop": {"epochs": 2, "patience": 1}, "dist": {"max_failures": 0}},
        "gate": {"holdout": f"{uri}/logs/test", "tolerance": 0.05}}))
    window = "2026-01-02..2026-01-02"
    assert main(["retrain", "--config", str(config), "--window", window, "--json"]) == 0
    out = capfd.readouterr().out
    report = json.loads(out[out.index("{\n"):])
    reg = Registry(*open_fs(f"{uri}/registry"))
    assert report["backbone"]["version"] == "v0002" and report["record"].startswith(f"{uri}/registry/retrain/ctr/")
    assert set(report["domains"]) == {"d00", "d01", "d02"} and report["promoted"]
    assert reg.aliases("backbones", "ctr")["production"] == "v0002"
    for d in report["promoted"]:
        assert reg.aliases("adapters", d)["production"] == report["domains"][d]["challenger"]["adapter"]
    record = report["record"][len("s3://"):]
    assert {"state.json", "report.md", "report.json", "champion.parquet", "challenger.parquet"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(record)}
    assert not fs.exists(f"{bucket}/registry/retrain/ctr/lock.json")  # the lease was released
    objects = set(fs.find(bucket))
    assert main(["retrain", "--config", str(config), "--window", window]) == 0  # done: nothing new
    assert set(fs.find(bucket)) == objects

    # the secret key: in no output, no S3 object, no local cache file, no Ray log
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    assert [p for p in fs.find(bucket) if SECRET.encode() in fs.cat_file(p)] == []
    local = [p for d in (cache_dir(f"{uri}/registry/runs"), s3_ray["session"]) if d.exists()
             for p in d.rglob("*") if p.is_file() and not p.is_socket()]
    assert len(local) > 10  # the cache and Ray's logs were there to look at
    assert [p for p in local if SECRET.encode() in p.read_bytes()] == []
