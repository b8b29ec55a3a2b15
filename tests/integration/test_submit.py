"""A real Ray head with token auth on 127.0.0.1; pretrain -> adapt -> add-domain -> score as Ray jobs.

Every client call is a separate ``mdlora submit`` process, as a user runs it: the token is
read by Ray from ``$HOME/.ray/auth_token`` (a temp HOME, so the user's ``~/.ray`` is untouched),
and a client without it is refused.
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

from infra.submit import masked
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
           "DASHBOARD_PORT": str(dashboard), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log, "w") as out:
        # the agent's HTTP port (default 52365) is fixed: another Ray on this machine would take it
        proc = subprocess.Popen([str(ROOT / "infra/scripts/ray-head-start.sh"), "--temp-dir", str(base / "r"),
                                 "--dashboard-agent-listen-port", str(free_port()), "--block"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
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


def test_credentials_are_masked():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "RAY_AUTH_TOKEN": "t0k", "DB_PASSWORD": "pw", "MDLORA_S3_ENDPOINT": "u"}
    assert masked(env) == {"AWS_SECRET_ACCESS_KEY": "***", "RAY_AUTH_TOKEN": "***", "DB_PASSWORD": "***",
                           "MDLORA_S3_ENDPOINT": "u"}


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
    secret = {"MDLORA_TEST_SECRET_KEY": "do-not-print-me"}

    job = _submit(head, ["--wait", "--env", f"MDLORA_TEST_SECRET_KEY={secret['MDLORA_TEST_SECRET_KEY']}",
                         "--", "pretrain", "--config", str(pretrain)], env)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "SUCCEEDED" in job.stdout and "backbone ctr v0001" in job.stdout  # the job's own log, streamed
    assert "do-not-print-me" not in job.stdout + job.stderr
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
