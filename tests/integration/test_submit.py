"""A real Ray head with token auth on 127.0.0.1; pretrain -> adapt -> add-domain -> score ->
retrain as Ray jobs.

Every client call is a separate process, as a user runs it: ``mdlora submit`` for the first four,
Ray's own ``ray job submit --working-dir .`` for the retrain. The token is read by Ray from
``$HOME/.ray/auth_token`` (a temp HOME, so the user's ``~/.ray`` is untouched), and a client
without it is refused.
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

from infra.synth import generate
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(home: Path) -> dict[str, str]:
    """This process's env without Ray settings (an earlier ray.init may have set RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home)}


@pytest.fixture(scope="module")
def head():
    """Start ``infra/scripts/ray-head-start.sh --block`` in its own process group; always stop it."""
    base = Path(tempfile.mkdtemp(prefix="mdlsub", dir="/tmp"))  # short: Ray's socket paths must fit
    home, log = base / "home", base / "head.log"
    home.mkdir()
    dashboard = free_port()
    env = {**_clean_env(home), "VENV": sys.prefix, "NUM_CPUS": "2", "RAY_PORT": str(free_port()),
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
    cmd = [sys.executable, "-m", "jobs.cli", "submit", "--address", head["url"], *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_client_without_the_token_is_refused(head, tmp_path):
    no_token = _submit(head, ["--", "bundles", "--help"], _clean_env(tmp_path))
    assert no_token.returncode == 2, no_token.stderr[-2000:]
    assert "Authentication required" in no_token.stderr
    wrong = _submit(head, ["--", "bundles", "--help"],
                    {**_clean_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode == 2 and "Authentication failed" in wrong.stderr, wrong.stderr[-2000:]


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "DB_PASSWORD", "aws_access_key_id"])
def test_credentials_are_refused_as_job_env(head, name, tmp_path):
    """Ray stores a job's env with the job (dashboard-readable): a credential never goes there."""
    env = {**_clean_env(head["home"]), "RAY_AUTH_MODE": "token"}
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {name: "do-not-print-me"}}))
    for args in (["--env", f"{name}=do-not-print-me"], ["--runtime-env", str(runtime_env)]):
        r = _submit(head, [*args, "--", "bundles", "--help"], env)
        assert r.returncode == 2, r.stderr[-2000:]
        assert name in r.stderr and "looks like a credential" in r.stderr
        assert "do-not-print-me" not in r.stdout + r.stderr and "submitted job" not in r.stdout
    ok = _submit(head, ["--env", "MDLORA_S3_ENDPOINT=http://127.0.0.1:9", "--", "bundles", "--help"], env)
    assert ok.returncode == 0 and "MDLORA_S3_ENDPOINT" in ok.stdout, ok.stderr[-2000:]  # not a credential


def _job_runtime_env(head: dict, env: dict[str, str], job_id: str) -> dict:
    """The runtime_env the cluster recorded for ``job_id`` (Jobs SDK, with the token)."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient; "
            "print(json.dumps(JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]).runtime_env))")
    out = subprocess.run([sys.executable, "-c", code, head["url"], job_id], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mixed_test_split(logs: Path, out: Path) -> int:
    """The test split of the schema's domains plus the added domain's, in one hive-partitioned dir."""
    shutil.copytree(logs / "test", out)
    for f in sorted((logs / "heldout" / "d03" / "test").rglob("*.parquet")):
        dest = out / f.parent.name / f"d03-{f.name}"
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(f, dest)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in out.rglob("*.parquet"))


def test_pretrain_adapt_add_domain_score_as_submitted_jobs(head):
    base = head["base"]
    logs, reg = base / "logs", base / "reg"
    generate(str(logs), rows=8_000, domains=4, seed=3, holdout_domains=1, users=300, items=300, days=2)
    data = {"schema": f"{logs}/schema.yaml", "train": f"{logs}/train", "val": f"{logs}/val"}
    output = {"root": str(reg), "model": "ctr"}
    pretrain = base / "pretrain.yaml"
    pretrain.write_text(yaml.safe_dump({
        "data": {**data, "batch_size": 512}, "model": {"hidden": [16, 8]}, "loop": {"epochs": 1, "log_every": 0},
        "dist": {"world_size": 2, "max_failures": 0}, "output": output}))
    adapt = base / "adapt.yaml"
    adapt.write_text(yaml.safe_dump({
        "data": {**data, "test": f"{logs}/test", "batch_size": 1024}, "lora": {"alpha": 4},
        "loop": {"epochs": 2, "patience": 1}, "dist": {"world_size": 1, "max_failures": 0}, "output": output}))
    env = {**_clean_env(head["home"]), "RAY_AUTH_MODE": "token"}

    job = _submit(head, ["--wait", "--", "pretrain", "--config", str(pretrain)], env)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "SUCCEEDED" in job.stdout and "backbone ctr v0001" in job.stdout  # the job's own log, streamed
    assert (reg / "backbones" / "ctr" / "v0001" / "manifest.json").is_file()

    job = _submit(head, ["--wait", "--", "adapt", "--config", str(adapt)], env)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    for domain in ("d00", "d01", "d02"):
        assert (reg / "adapters" / domain / "v0001" / "manifest.json").is_file()

    job = _submit(head, ["--wait", "--", "add-domain", "--config", str(adapt), "--domain", "d03",
                         "--data", str(logs / "heldout" / "d03")], env)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert (reg / "adapters" / "d03" / "v0001" / "manifest.json").is_file()

    # score through the Jobs API, with a runtime_env file as `ray job submit --runtime-env` takes
    rows = _mixed_test_split(logs, base / "mixed")
    runtime_env = base / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump({"env_vars": {"MDLORA_TEST_FLAG": "from-file"}, "excludes": ["tests/"]}))
    preds = base / "preds.parquet"
    job = _submit(head, ["--wait", "--runtime-env", str(runtime_env), "--", "score", "--config", str(adapt),
                         "--data", str(base / "mixed"), "--out", str(preds)], env)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert f"scored {rows} rows" in job.stdout and "fallback rows (no adapter for their domain): 0" in job.stdout
    table = pq.read_table(preds)
    assert table.num_rows == rows and set(table.column("adapter_version").to_pylist()) == {"v0001"}
    assert set(table.column("domain").to_pylist()) == {"d00", "d01", "d02", "d03"}
    recorded = _job_runtime_env(head, env, re.search(r"submitted job (\S+) to", job.stdout).group(1))
    assert recorded["env_vars"]["MDLORA_TEST_FLAG"] == "from-file" and "tests/" in recorded["excludes"]

    failed = _submit(head, ["--wait", "--", "pretrain", "--config", str(base / "missing.yaml")], env)
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout[-3000:]

    # the scheduled retrain, submitted with Ray's own CLI exactly as the README shows it
    retrain = base / "retrain.yaml"
    retrain.write_text(yaml.safe_dump({
        "pretrain": {"data": {**data, "batch_size": 512}, "loop": {"epochs": 1, "log_every": 0},
                     "dist": {"world_size": 1, "max_failures": 0}, "output": output},
        "adapt": {"lora": {"alpha": 4}, "loop": {"epochs": 2, "patience": 1},  # d03 only: one adapter run
                  "data": {"batch_size": 1024, "domains": ["d03"]}, "dist": {"world_size": 1, "max_failures": 0}},
        "gate": {"holdout": f"{logs}/test", "tolerance": 0.05}}))
    window = "2026-01-02..2026-01-02"
    job = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head["url"],
                          "--working-dir", ".", "--", "mdlora", "retrain", "--config", str(retrain), "--window",
                          window], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower() and f"retrain ctr {window}: backbone v0001 -> v0002" in job.stdout
    (run,) = (reg / "retrain" / "ctr").glob("2026-01-02_2026-01-02-*")
    report = json.loads((run / "report.json").read_text())
    assert set(report["domains"]) == {"d00", "d01", "d02", "d03"}
    added = report["domains"]["d03"]  # added above, rebased on its own logs, gated on its own test split
    assert added["challenger"]["backbone"] == "v0002" and added["challenger"]["adapter"] == "v0002"
    assert added["holdout"].endswith("heldout/d03/test") and added["challenger"]["rows"] > 0
    # the cluster's token appears in nothing a client printed, nor in anything a job wrote (the
    # client's ~/.ray and the head's own temp dir are where it is kept)
    token = (head["home"] / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 16 and token not in job.stdout + job.stderr
    written = [p for p in base.rglob("*") if p.is_file() and p.relative_to(base).parts[0] not in ("home", "r")]
    assert len(written) > 20 and [p for p in written if token.encode() in p.read_bytes()] == []
