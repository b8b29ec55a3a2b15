"""A real Ray head with token auth on 127.0.0.1; pretrain -> adapt -> add-domain through the Jobs API.

Every client call is a separate ``mdlora submit`` process, as a user runs it: the token is
read by Ray from ``$HOME/.ray/auth_token`` (a temp HOME, so the user's ``~/.ray`` is untouched),
and a client without it is refused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def test_credentials_are_masked():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "RAY_AUTH_TOKEN": "t0k", "DB_PASSWORD": "pw", "MDLORA_S3_ENDPOINT": "u"}
    assert masked(env) == {"AWS_SECRET_ACCESS_KEY": "***", "RAY_AUTH_TOKEN": "***", "DB_PASSWORD": "***",
                           "MDLORA_S3_ENDPOINT": "u"}


def test_pretrain_adapt_add_domain_as_submitted_jobs(head):
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

    failed = _submit(head, ["--wait", "--", "pretrain", "--config", str(base / "missing.yaml")], env)
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout[-3000:]
