"""Credentials never leak; nothing a user did not write is unpickled.

* A run against S3 (moto) with a sentinel secret key: gen-logs, registry publish, bundles
  list/show/verify, score, and an S3 request that fails. The secret must appear in no stdout or
  stderr (logs included), in no object the run wrote (manifests, registry JSON, predictions,
  logs), and in no exception message.
* ``mdlora submit`` with a sentinel Ray token against an unreachable cluster: the token is not
  echoed in the error.
* Source scan: every ``torch.load`` passes ``weights_only=True``; nothing calls ``pickle.load``
  / ``pickle.loads``; every ``dcp.load`` reads through ``SafeReader``; adapter bundles hold
  safetensors and JSON only.
* A backbone whose DCP ``.metadata`` pickle was replaced by one that runs code (and resealed, so
  its checksums match): loading refuses it, naming the file and the global, and the code never runs.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.reliability.conftest import ROOT, SECRET, adapt_overrides, cli, sets

PACKAGES = ("mdlora", "embeddings", "adapters", "trainer", "infra", "jobs", "benchmarks")
TOKEN = "ray-token-SENTINEL-0d9c2b7e41f84a6c"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            yield (owner.id if isinstance(owner, ast.Name) else ast.unparse(owner)), node.func.attr, node


def test_no_unsafe_deserialisation_in_the_source():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30
    bad = []
    for path in files:
        for owner, attr, node in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and attr == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            elif owner in {"pickle", "cPickle", "dill", "cloudpickle", "joblib"} and attr in {"load", "loads"}:
                bad.append(f"{where}: {owner}.{attr}")
            elif owner == "dcp" and attr == "load" and "storage_reader" not in {k.arg for k in node.keywords}:
                bad.append(f"{where}: dcp.load without storage_reader=SafeReader(...)")
            elif attr == "FileSystemReader":
                bad.append(f"{where}: DCP's FileSystemReader unpickles .metadata; use SafeReader")
            elif owner in {"np", "numpy"} and attr == "load" and any(
                    k.arg == "allow_pickle" for k in node.keywords):
                bad.append(f"{where}: numpy.load(allow_pickle=...)")
    assert bad == []


class _Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_backbone_whose_checkpoint_metadata_runs_code_is_refused(world, tmp_path):
    import pickle

    from mdlora.embeddings.schema import Schema
    from mdlora.infra.artifacts.sealed import read_manifest, seal
    from mdlora.trainer.config import ModelConfig
    from mdlora.trainer.recipes import load_unsharded

    backbone = tmp_path / "v0001"
    shutil.copytree(world["backbone"]["path"], backbone)
    marker = tmp_path / "pwned"
    (backbone / ".metadata").write_bytes(pickle.dumps(_Payload(f"touch {marker}")))
    manifest = read_manifest(str(backbone))
    seal(backbone, {k: v for k, v in manifest.items() if k not in ("files", "content_hash")})  # checksums match
    with pytest.raises(pickle.UnpicklingError, match=r"\.metadata: refusing to load posix\.system"):
        load_unsharded(backbone, Schema.load(backbone / "schema.yaml"), ModelConfig(hidden=[16, 8]))
    assert not marker.exists()
    # the untampered original still loads
    load_unsharded(Path(world["backbone"]["path"]), Schema.load(backbone / "schema.yaml"), ModelConfig(hidden=[16, 8]))


def test_adapter_bundles_are_safetensors_and_json_only(world):
    from safetensors import safe_open

    for version in sorted((Path(world["root"]) / "adapters").glob("*/v*")):
        names = sorted(p.name for p in version.iterdir() if p.is_file() and p.name != ".reservation")
        assert names == ["adapter.safetensors", "manifest.json"], (version, names)
        with safe_open(str(version / "adapter.safetensors"), "pt") as f:  # parses as safetensors
            assert list(f.keys())


@pytest.mark.integration
def test_secret_key_never_appears_in_outputs(world, s3_server, tmp_path, monkeypatch, capfd):
    import s3fs

    from mdlora.infra.artifacts.registry import Registry
    from mdlora.infra.storage import open_fs
    from mdlora.jobs.cli import main

    monkeypatch.setenv("MDLORA_S3_ENDPOINT", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "sentinel-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs, _ = open_fs("s3://x")
    bucket = f"mdlora-sec-{free_port()}"
    fs.call_s3("create_bucket", Bucket=bucket)
    reg_uri = f"s3://{bucket}/registry"

    assert main(["gen-logs", "--out", f"s3://{bucket}/logs", "--rows", "3000", "--domains", "2"]) == 0
    reg = Registry(*open_fs(reg_uri))
    reg.promote("backbones", "ctr", reg.publish("backbones", "ctr", Path(world["root"]) / "backbones/ctr/v0001"))
    reg.promote("adapters", "d00", reg.publish("adapters", "d00", world["bundle"]))
    for action in (["list"], ["show", "d00"], ["verify", "d00"], ["list", "--kind", "backbones"]):
        assert main(["bundles", *action, "--root", reg_uri]) == 0
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    over = adapt_overrides(world["logs"], reg_uri) + [f"output.run_dir={tmp_path / 'runs'}"]
    assert main(["score", "--config", str(config), "--data", str(world["logs"] / "test"),
                 "--out", f"s3://{bucket}/preds.parquet", *sets(over)]) == 0
    # S3 requests that fail: a missing bucket, and a prefix holding nothing
    messages = []
    for uri in (f"s3://no-such-bucket-{free_port()}/registry", f"s3://{bucket}/nothing-here"):
        try:
            Registry(*open_fs(uri)).resolve("adapters", "d00")
        except Exception as e:  # noqa: BLE001 - any failure: its text must be clean
            messages.append(f"{type(e).__name__}: {e} {e.__cause__!r} {e.__context__!r}")
    assert len(messages) == 2
    assert main(["bundles", "show", "d00", "--root", f"s3://no-such-bucket-{free_port()}/r"]) == 2

    out, err = capfd.readouterr()
    objects = {p: fs.cat_file(p) for p in fs.find(bucket)}
    assert f"{bucket}/registry/adapters/d00/v0001/manifest.json" in objects and f"{bucket}/preds.parquet" in objects
    local = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert SECRET not in out + err + "\n".join(messages)
    assert [p for p, data in {**objects, **local}.items() if SECRET.encode() in data] == []
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_ray_token_not_echoed_by_submit(tmp_path):
    r = cli(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "bundles", "--help"],
            env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "HOME": str(tmp_path)}, timeout=180)
    assert r.returncode != 0
    assert TOKEN not in r.stdout + r.stderr


EMBEDDED_DASHBOARD = """
import json, urllib.error, urllib.request
from mdlora.infra.ray_backend import init_ray
init_ray(num_cpus=1)
import ray
url = "http://" + ray._private.worker.get_dashboard_url()
codes = {}
for name, headers in (("no token", {}), ("wrong token", {"Authorization": "Bearer " + "0" * 32})):
    try:
        urllib.request.urlopen(urllib.request.Request(url + "/api/jobs/", headers=headers), timeout=30)
        codes[name] = 200
    except urllib.error.HTTPError as e:
        codes[name] = e.code
print(json.dumps({"url": url, "codes": codes}))
"""


@pytest.mark.integration
def test_the_embedded_rays_job_api_listens_on_loopback_and_requires_the_token(tmp_path):
    """Every job without ``dist.address`` starts its own Ray, dashboard and job API included:
    a local user without the token must not be able to submit code to it."""
    import json

    from tests.reliability.conftest import py

    r = py(EMBEDDED_DASHBOARD, env={"HOME": str(tmp_path)}, timeout=240)  # a fresh ~/.ray: its own token
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["url"].startswith("http://127.0.0.1:")
    assert out["codes"] == {"no token": 401, "wrong token": 403}
