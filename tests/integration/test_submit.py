"""A real Ray head with token auth on 127.0.0.1 and S3 storage (moto); pretrain -> adapt ->
add-domain -> score -> retrain as Ray jobs, as a team runs them on a cluster.

Every client call is a separate process, as a user runs it: ``mdlora submit`` for the first four,
Ray's own ``ray job submit --working-dir .`` for the retrain. The token is read by Ray from
``$HOME/.ray/auth_token`` (a temp HOME, so the user's ``~/.ray`` is untouched), and a client
without it is refused. Logs, the registry, Ray's checkpoints and the run records live on S3; the
cluster gets the S3 credentials from its own environment (the head's), the clients never have
them, and the secret key appears in nothing the jobs print or write, nor in Ray's logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mdlora.infra.synth import generate
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(home: Path) -> dict[str, str]:
    """This process's env without Ray settings (an earlier ray.init may have set RAY_AUTH_MODE)
    and without S3 credentials (a client that submits jobs needs none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    return {**env, "HOME": str(home)}


SECRET = "cluster-secret-SENTINEL-do-not-log"


@pytest.fixture(scope="module")
def s3(s3_server):
    """A bucket on the moto server, and this process's S3 environment for the test's own reads."""
    import s3fs

    env = {"MDLORA_S3_ENDPOINT": s3_server, "AWS_ACCESS_KEY_ID": "cluster-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"mdlora-jobs-{free_port()}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server, "region_name": "us-east-1"},
                           skip_instance_cache=True, use_listings_cache=False)  # sees what the jobs wrote
    fs.call_s3("create_bucket", Bucket=bucket)
    yield {"env": env, "fs": fs, "bucket": bucket, "uri": f"s3://{bucket}"}
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def head(s3):
    """Start ``infra/scripts/ray-head-start.sh --block`` in its own process group (with the S3
    credentials in its environment, as a cluster's nodes have them); always stop it."""
    base = Path(tempfile.mkdtemp(prefix="mdlsub", dir="/tmp"))  # short: Ray's socket paths must fit
    home, log = base / "home", base / "head.log"
    home.mkdir()
    dashboard = free_port()
    env = {**_clean_env(home), **s3["env"], "VENV": sys.prefix, "NUM_CPUS": "2", "RAY_PORT": str(free_port()),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"),
           "DASHBOARD_PORT": str(dashboard), "DASHBOARD_AGENT_PORT": str(free_port()),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(ROOT / "infra/scripts/ray-head-start.sh"), "--temp-dir", str(base / "r"),
                                 "--block"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{dashboard}", "home": home, "base": base}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def _submit(head: dict, args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mdlora.jobs.cli", "submit", "--address", head["url"], *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_client_without_the_token_is_refused(head, tmp_path):
    no_token = _submit(head, ["--", "bundles", "--help"], _clean_env(tmp_path))
    assert no_token.returncode == 2, no_token.stderr[-2000:]
    assert "Authentication required" in no_token.stderr
    wrong = _submit(head, ["--", "bundles", "--help"],
                    {**_clean_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode == 2 and "Authentication failed" in wrong.stderr, wrong.stderr[-2000:]


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "DB_PASSWORD", "aws_access_key_id"])
def test_credential_like_job_env_is_refused(name):
    from mdlora.infra.submit import job_runtime_env

    for base, extra in (({"env_vars": {name: "do-not-print-me"}}, None), (None, {name: "do-not-print-me"})):
        with pytest.raises(ValueError, match="looks like a credential") as e:
            job_runtime_env(base, None, extra)
        assert name in str(e.value) and "do-not-print-me" not in str(e.value)
    assert job_runtime_env(None, None, {"MDLORA_S3_ENDPOINT": "http://x"})["env_vars"] == {"MDLORA_S3_ENDPOINT": "http://x"}


def test_submit_refuses_a_credential_as_job_env_before_contacting_the_cluster(head, tmp_path):
    """Ray stores a job's env with the job (dashboard-readable): a credential never goes there."""
    env = {**_clean_env(head["home"]), "RAY_AUTH_MODE": "token"}
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {"AWS_SECRET_ACCESS_KEY": "do-not-print-me"}}))
    r = _submit(head, ["--runtime-env", str(runtime_env), "--env", "MDLORA_FLAG=1", "--", "bundles", "--help"], env)
    assert r.returncode == 2 and "AWS_SECRET_ACCESS_KEY" in r.stderr and "looks like a credential" in r.stderr
    assert "do-not-print-me" not in r.stdout + r.stderr and "submitted job" not in r.stdout


def _job_runtime_env(head: dict, env: dict[str, str], job_id: str) -> dict:
    """The runtime_env the cluster recorded for ``job_id`` (Jobs SDK, with the token)."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient; "
            "print(json.dumps(JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]).runtime_env))")
    out = subprocess.run([sys.executable, "-c", code, head["url"], job_id], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mixed_test_split(fs, logs: str, out: str) -> int:
    """The test split of the schema's domains plus the added domain's, in one hive-partitioned dir."""
    rows = 0
    for src in sorted(fs.find(f"{logs}/test")) + sorted(fs.find(f"{logs}/heldout/d03/test")):
        part = src.split("/")[-2]  # date=...
        dest = f"{out}/{part}/{'d03-' if '/heldout/' in src else ''}{src.rsplit('/', 1)[-1]}"
        fs.copy(src, dest)
        with fs.open(dest, "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    return rows


def _ok(job: subprocess.CompletedProcess) -> str:
    """The job's streamed output, after checking it succeeded and shows no secret."""
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert SECRET not in job.stdout + job.stderr
    return job.stdout


def test_pretrain_adapt_add_domain_score_retrain_as_jobs_on_s3(head, s3):
    fs, bucket, uri = s3["fs"], s3["bucket"], s3["uri"]
    base = head["base"]
    logs, reg = f"{uri}/logs", f"{uri}/registry"
    generate(logs, rows=8_000, domains=4, seed=3, holdout_domains=1, users=300, items=300, days=2)
    data = {"schema": f"{logs}/schema.yaml", "train": f"{logs}/train", "val": f"{logs}/val"}
    output = {"root": reg, "model": "ctr"}
    pretrain = base / "pretrain.yaml"
    pretrain.write_text(yaml.safe_dump({
        "data": {**data, "batch_size": 512}, "model": {"hidden": [16, 8]}, "loop": {"epochs": 1, "log_every": 0},
        "dist": {"world_size": 1, "max_failures": 0}, "output": output}))
    adapt = base / "adapt.yaml"
    adapt.write_text(yaml.safe_dump({
        "data": {**data, "test": f"{logs}/test", "batch_size": 1024}, "lora": {"alpha": 4},
        "loop": {"epochs": 2, "patience": 1}, "dist": {"world_size": 1, "max_failures": 0}, "output": output}))
    env = {**_clean_env(head["home"]), "RAY_AUTH_MODE": "token"}
    published = lambda kind, name, v: fs.exists(f"{bucket}/registry/{kind}/{name}/{v}/manifest.json")  # noqa: E731

    out = _ok(_submit(head, ["--wait", "--", "pretrain", "--config", str(pretrain)], env))
    assert "SUCCEEDED" in out and "backbone ctr v0001" in out  # the job's own log, streamed
    assert published("backbones", "ctr", "v0001") and fs.ls(f"{bucket}/registry/runs")  # Ray's checkpoints too

    _ok(_submit(head, ["--wait", "--", "adapt", "--config", str(adapt)], env))
    assert all(published("adapters", d, "v0001") for d in ("d00", "d01", "d02"))

    _ok(_submit(head, ["--wait", "--", "add-domain", "--config", str(adapt), "--domain", "d03",
                       "--data", f"{logs}/heldout/d03"], env))
    assert published("adapters", "d03", "v0001")

    # score through the Jobs API, with a runtime_env file as `ray job submit --runtime-env` takes
    rows = _mixed_test_split(fs, f"{bucket}/logs", f"{bucket}/mixed")
    runtime_env = base / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {"MDLORA_TEST_FLAG": "from-file"}, "excludes": ["tests/"]}))
    job = _submit(head, ["--wait", "--runtime-env", str(runtime_env), "--", "score", "--config", str(adapt),
                         "--data", f"{uri}/mixed", "--out", f"{uri}/preds.parquet"], env)
    out = _ok(job)
    assert f"scored {rows} rows" in out and "fallback rows (no adapter for their domain): 0" in out
    with fs.open(f"{bucket}/preds.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == rows and set(table.column("adapter_version").to_pylist()) == {"v0001"}
    assert set(table.column("domain").to_pylist()) == {"d00", "d01", "d02", "d03"}
    recorded = _job_runtime_env(head, env, re.search(r"submitted job (\S+) to", out).group(1))
    assert recorded["env_vars"]["MDLORA_TEST_FLAG"] == "from-file" and "tests/" in recorded["excludes"]

    failed = _submit(head, ["--wait", "--", "pretrain", "--config", str(base / "missing.yaml")], env)
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout[-3000:]

    # the scheduled retrain, submitted with Ray's own CLI exactly as the README shows it
    retrain = base / "retrain.yaml"
    retrain.write_text(yaml.safe_dump({
        "pretrain": {"data": {**data, "batch_size": 512}, "loop": {"epochs": 1, "log_every": 0},
                     "dist": {"world_size": 1, "max_failures": 0}, "output": output},
        "adapt": {"lora": {"alpha": 4}, "loop": {"epochs": 2, "patience": 1},
                  "data": {"batch_size": 1024, "domains": ["d00", "d03"]}, "dist": {"world_size": 1, "max_failures": 0}},
        "gate": {"holdout": f"{logs}/test", "tolerance": 0.05}}))
    window = "2026-01-02..2026-01-02"
    job = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head["url"],
                          "--working-dir", ".", "--", "mdlora", "retrain", "--config", str(retrain), "--window",
                          window], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = _ok(job)
    assert "succeeded" in out.lower() and f"retrain ctr {window}: backbone v0001 -> v0002" in out
    (record,) = fs.glob(f"{bucket}/registry/retrain/ctr/2026-01-02_2026-01-02-*")
    report = json.loads(fs.cat_file(f"{record}/report.json"))
    assert set(report["domains"]) == {"d00", "d01", "d02", "d03"}
    assert report["domains"]["d00"]["challenger"]["backbone"] == "v0002"
    added = report["domains"]["d03"]  # added above, rebased on its own logs, gated on its own test split
    assert added["challenger"]["backbone"] == "v0002" and added["challenger"]["adapter"] == "v0002"
    assert added["holdout"] == f"{logs}/heldout/d03/test" and added["challenger"]["rows"] > 0
    assert not fs.exists(f"{bucket}/registry/retrain/ctr/lock.json")  # the S3 lease was released

    # no secret and no token in anything the jobs wrote to S3 or Ray logged; the token is kept in
    # the client's ~/.ray and the head's temp dir only
    token = (head["home"] / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16 and token not in out
    objects = fs.find(bucket)
    assert len(objects) > 30
    assert [p for p in objects if any(x.encode() in fs.cat_file(p) for x in (SECRET, token))] == []
    logged = [p for p in (base / "r").rglob("*") if p.is_file() and "/logs/" in str(p)]
    assert len(logged) > 10 and [p for p in logged if SECRET.encode() in p.read_bytes()] == []
