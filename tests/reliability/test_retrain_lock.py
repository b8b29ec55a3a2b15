"""One retrain per model at a time: a second ``mdlora retrain`` is refused while the lock is held
(exit 3, naming the holder); a killed holder frees it (local flock); S3 leases refuse, renew,
expire and are taken over, and a holder that lost its lease notices before promoting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdlora.infra.retrain_lock import RetrainLock, RetrainLocked

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from mdlora.infra.retrain_lock import RetrainLock
lock = RetrainLock(sys.argv[1], "ctr", {"run": "holder"}, 60)
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _mdlora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mdlora.jobs.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_a_second_retrain_is_refused_while_another_holds_the_lock_and_a_killed_holder_frees_it(tmp_path):
    reg = tmp_path / "reg"
    config = tmp_path / "retrain.yaml"
    config.write_text(f"pretrain: {{output: {{root: {reg}, model: ctr}}}}\ngate: {{holdout: {tmp_path}/holdout}}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(reg)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = _mdlora("retrain", "--config", str(config), "--window", "2026-01-02..2026-01-03")
        assert refused.returncode == 3, refused.stderr
        assert "another retrain of this model is running" in refused.stderr
        assert f'"pid": {holder.pid}' in refused.stderr and '"run": "holder"' in refused.stderr
        with pytest.raises(RetrainLocked, match="released when that process exits"):
            RetrainLock(str(reg), "ctr", {"run": "in-process"}, 60).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RetrainLock(str(reg), "ctr", {"run": "after-crash"}, 60):  # no stale lock after a crash
        with pytest.raises(RetrainLocked):  # and this holder excludes others in turn
            RetrainLock(str(reg), "ctr", {"run": "second"}, 60).acquire()
    assert not (reg / "backbones").exists()  # the refused run touched nothing


@pytest.mark.integration
def test_s3_lease_refuses_renews_expires_and_is_taken_over(s3_env):
    root = f"{s3_env}/reg"
    a = RetrainLock(root, "ctr", {"run": "a"}, ttl=4)  # renewed every 1.3 s: generous, so a loaded machine still renews in time
    a.acquire()
    try:
        with pytest.raises(RetrainLocked, match='"run": "a"'):
            RetrainLock(root, "ctr", {"run": "b"}, ttl=60).acquire()
        time.sleep(6)  # longer than the ttl: only the renewals keep it
        a.check()
        with pytest.raises(RetrainLocked):
            RetrainLock(root, "ctr", {"run": "b"}, ttl=60).acquire()
    finally:
        a.release()
    assert not a.fs.exists(a.path)  # released: the lease object is gone

    # a crashed holder leaves an expired lease: the next retrain takes it over
    c = RetrainLock(root, "ctr", {"run": "c"}, ttl=60)
    c.acquire()
    c.fs.pipe_file(c.path, json.dumps({"run": "crashed", "pid": os.getpid(), "expires": time.time() - 1}).encode())
    with pytest.raises(RetrainLocked, match="lost the retrain lock"):
        c.check()  # c would stop here, before moving any alias
    d = RetrainLock(root, "ctr", {"run": "d"}, ttl=60)
    d.acquire()
    d.check()
    c.release()  # not c's any more: d's lease stays
    assert json.loads(d.fs.cat_file(d.path))["run"] == "d"
    d.release()
    assert not d.fs.exists(d.path)
