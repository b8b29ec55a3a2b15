"""Disk full and permission denied on the output path: one clear error line, exit 2, nothing partial.

"Disk full" is a file-size limit (``RLIMIT_FSIZE``: writes past it fail with EFBIG, as they fail
with ENOSPC on a full disk; Python ignores SIGXFSZ). Only the soft limit is lowered, inside this
process, and restored at once. "Permission denied" is a read-only directory: mode 0555 for a
normal user; as root (who ignores modes) the ext4 immutable attribute (``chattr +i``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import ray

from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.storage import open_fs
from mdlora.jobs.cli import main
from tests.reliability.conftest import adapt_overrides, run_overrides, sets


@contextlib.contextmanager
def file_size_limit(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def read_only(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o555)
        undo = ["chmod", "755", str(directory)]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(directory)]).returncode == 0:
        undo = ["chattr", "-i", str(directory)]
    else:
        pytest.skip("running as root on a file system without chattr +i: cannot make a read-only dir")
    try:
        yield directory
    finally:
        subprocess.run(undo, check=True)


def _one_error(capsys, command: str, *expect: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mdlora {command}: error: "), err
    assert any(e in err[0] for e in expect), err[0]
    return err[0]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _score_argv(world, tmp_path: Path, out: Path, root: Path | None = None, tracked: bool = False) -> list[str]:
    """``mdlora score`` of the world's test logs into ``out``; untracked unless ``tracked``: the
    predictions file is what these tests fill (the tracking store's own disk-full has its test)."""
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    return ["score", "--config", str(config), "--data", str(world["logs"] / "test"), "--out", str(out),
            *sets(adapt_overrides(world["logs"], root or world["root"]) + [f"tracking.enabled={str(tracked).lower()}"])]


def test_disk_full_gen_logs(tmp_path, capsys):
    with file_size_limit(8 << 10):
        rc = main(["gen-logs", "--out", str(tmp_path / "out" / "logs"), "--rows", "20000", "--domains", "2"])
    assert rc == 2
    line = _one_error(capsys, "gen-logs", "File too large", "No space left")
    assert str(tmp_path / "out" / "logs") in line  # names where it could not write
    assert _leftovers(tmp_path / "out") == []  # not even a hidden staging directory


def test_disk_full_score(world, tmp_path, capsys):
    out = tmp_path / "preds" / "p.parquet"
    (tmp_path / "preds").mkdir()
    argv = _score_argv(world, tmp_path, out)
    with file_size_limit(2 << 10):
        rc = main(argv)
    assert rc == 2
    line = _one_error(capsys, "score", "File too large", "No space left")
    assert str(out) in line
    assert _leftovers(tmp_path / "preds") == []
    assert main(argv) == 0 and _leftovers(tmp_path / "preds") == ["p.parquet"]  # room again: it works


def test_disk_full_tracking_store(world, tmp_path, capsys):
    """The embedded tracking store is opened first: a full disk there is one line naming it."""
    root = tmp_path / "registry"
    shutil.copytree(world["root"], root)
    (tmp_path / "preds").mkdir()
    argv = _score_argv(world, tmp_path, tmp_path / "preds" / "p.parquet", root, tracked=True)
    with file_size_limit(2 << 10):
        assert main(argv) == 2
    line = _one_error(capsys, "score", "tracking")
    assert str(root / "tracking" / "mlflow.db") in line and "tracking.enabled=false" in line
    assert _leftovers(tmp_path / "preds") == []
    assert main(argv) == 0  # room again: it works, and the store holds the scoring run's figures
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/tracking/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("mdlora-ctr").experiment_id], "tags.`mdlora.job` = 'score'")
    assert run.info.status == "FINISHED" and run.data.tags["mdlora.backbone_version"] == world["backbone"]["version"]
    assert run.data.metrics["rows"] > 0 and any(k.startswith("score/d0") for k in run.data.metrics)


def test_disk_full_registry_publish(world, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(world["root"], root)
    reg = Registry(*open_fs(str(root)))
    source = tmp_path / "backbone"
    shutil.copytree(root / "backbones/ctr/v0001", source)
    with file_size_limit(4 << 10), pytest.raises(OSError, match="File too large") as err:
        reg.publish("backbones", "ctr", source)
    assert str(root / "backbones" / "ctr" / "v0002") in str(err.value)
    assert reg.versions("backbones", "ctr") == ["v0001"]
    assert reg.aliases("backbones", "ctr") == {"latest": "v0001", "production": "v0001"}
    assert reg.verify("backbones", "ctr", "v0001") == []
    assert reg.publish("backbones", "ctr", source) == "v0003"
    assert reg.verify("backbones", "ctr", "v0003") == []


def test_permission_denied_gen_logs(tmp_path, capsys):
    with read_only(tmp_path / "ro") as ro:
        rc = main(["gen-logs", "--out", str(ro / "logs"), "--rows", "2000", "--domains", "2"])
        assert rc == 2
        _one_error(capsys, "gen-logs", "Permission denied", "Operation not permitted")
        assert _leftovers(ro) == []


def test_permission_denied_score(world, tmp_path, capsys):
    with read_only(tmp_path / "ro") as ro:
        assert main(_score_argv(world, tmp_path, ro / "p.parquet")) == 2
        line = _one_error(capsys, "score", "Permission denied", "Operation not permitted")
        assert str(ro) in line
        assert _leftovers(ro) == []


@pytest.mark.parametrize("job", ["pretrain", "adapt"])
def test_permission_denied_training_output_is_refused_before_ray(job, world, tmp_path, capsys):
    """A registry the job could not publish to is refused before Ray starts, not after training."""
    if ray.is_initialized():
        ray.shutdown()
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    root = tmp_path / "ro"
    if job == "adapt":  # the backbone to adapt is there (readable); the bundles could not be
        shutil.copytree(world["root"], root)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
    overrides = run_overrides if job == "pretrain" else adapt_overrides
    with read_only(root):
        assert main([job, "--config", str(config), *sets(overrides(world["logs"], root))]) == 2
        line = _one_error(capsys, job, "Permission denied", "Operation not permitted")
        assert "output.root" in line and str(root) in line
        assert not ray.is_initialized()
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # no probe left


def test_file_where_a_directory_is_expected(tmp_path, capsys):
    (tmp_path / "plain").write_text("not a directory\n")
    assert main(["gen-logs", "--out", str(tmp_path / "plain" / "logs"), "--rows", "2000", "--domains", "2"]) == 2
    line = _one_error(capsys, "gen-logs", "File exists", "Not a directory")
    assert "plain" in line
    assert (tmp_path / "plain").read_text() == "not a directory\n"
