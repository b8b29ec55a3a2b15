"""`mdlora pretrain` with logs, Ray checkpoints and the published backbone all on S3 (moto).

Ray workers read S3 credentials from their own environment (as on a cluster: IAM role, or
variables set when the nodes start), so the environment is set before the local Ray starts.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.integration.test_pretrain import run_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    import ray
    import s3fs

    env = {"MDLORA_S3_ENDPOINT": s3_server, "AWS_ACCESS_KEY_ID": "testing-key",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = f"mdlora-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                      client_kwargs={"endpoint_url": s3_server, "region_name": "us-east-1"}
                      ).call_s3("create_bucket", Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield f"s3://{bucket}"
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_pretrain_from_s3_to_s3(s3_ray, tmp_path):
    from infra.pretrain import pretrain
    from infra.storage import open_fs
    from infra.synth import generate

    fs, bucket = open_fs(s3_ray)
    generate(f"{s3_ray}/logs", rows=12_000, domains=3, seed=4, users=2000, items=2000)
    logs = tmp_path / "unused"
    cfg = run_config(logs, tmp_path, epochs=1, checkpoint_every=0)
    for k in ("schema", "train", "val"):
        setattr(cfg.data, k, getattr(cfg.data, k).replace(str(logs), f"{s3_ray}/logs"))
    cfg.dist.world_size = 1
    cfg.output.root = f"{s3_ray}/registry"
    summary = pretrain(cfg, run_name="s3-test")

    assert summary["path"] == f"{s3_ray}/registry/backbones/ctr/v0001"
    published = summary["path"][len("s3://"):]
    manifest = json.loads(fs.cat(f"{published}/manifest.json"))
    assert manifest["content_hash"] == summary["content_hash"]
    assert {"plan.json", "train_state.json", ".metadata", "__0_0.distcp"} <= set(manifest["files"])
    # Ray persisted its checkpoints to S3 too (output.run_dir defaults to <root>/runs)
    assert fs.ls(f"{bucket}/registry/runs/s3-test")
    assert summary["metrics"]["wauc"] > 0.55
