"""A process SIGKILLed while writing a backbone, a bundle or the registry index.

Each case runs the real writer in a child process with ``MDLORA_FAULT_WRITE`` set, which kills
it (SIGKILL, no clean-up) after the data is staged and just before the commit (see
``mdlora.faults.before_write``). Pretraining checkpoints commit through Ray Train; rank 0
killed inside that write is ``tests/integration/test_pretrain.py``. Afterwards the previous version must be intact and current,
nothing partial may be visible, and running the same write again must succeed.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.storage import open_fs
from tests.reliability.conftest import publish_untrained_backbone, py, write_test_bundle

KILLED = -signal.SIGKILL


@pytest.fixture
def registry(world, tmp_path) -> tuple[Registry, Path]:
    """A private copy of the session registry (backbone ctr v0001, adapter d00 v0001)."""
    root = tmp_path / "registry"
    shutil.copytree(world["root"], root)
    return Registry(*open_fs(str(root))), root


def _killed(code: str, fault: str) -> None:
    r = py(code, env={"MDLORA_FAULT_WRITE": fault})
    assert r.returncode == KILLED, (r.returncode, r.stderr[-2000:])


def _intact(reg: Registry, kind: str, name: str, versions: list[str], aliases: dict[str, str]) -> None:
    assert reg.versions(kind, name) == versions
    assert reg.aliases(kind, name) == aliases
    for v in versions:
        assert reg.verify(kind, name, v) == [], v


def test_backbone_publish(registry, world):
    """``publish_backbone`` killed after copying the shards, before the version's manifest."""
    reg, root = registry
    code = f"""
from pathlib import Path
from tests.reliability.conftest import publish_untrained_backbone
publish_untrained_backbone(Path({str(world['logs'])!r}), Path({str(root)!r}))
"""
    _killed(code, "backbones/ctr/v0002/manifest.json")
    assert (root / "backbones/ctr/v0002/.metadata").exists()  # the data files were copied ...
    _intact(reg, "backbones", "ctr", ["v0001"], {"latest": "v0001", "production": "v0001"})  # ... unseen
    summary = publish_untrained_backbone(world["logs"], root)
    assert summary["version"] == "v0003"  # a dead publisher's number is never reused
    _intact(reg, "backbones", "ctr", ["v0001", "v0003"], {"latest": "v0003", "production": "v0001"})


def test_bundle_write(registry, world, tmp_path):
    """``write_bundle`` killed before its staging directory is renamed into place."""
    reg, root = registry
    dest = tmp_path / "bundles" / "d01"
    backbone = {k: world["backbone"][k] for k in ("path", "version", "content_hash")}
    code = f"""
from pathlib import Path
from tests.reliability.conftest import write_test_bundle
write_test_bundle(Path({str(dest)!r}), {backbone!r}, "d01")
"""
    _killed(code, "bundles/d01")
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if not p.name.startswith(".")] == []
    write_test_bundle(dest, world["backbone"], "d01")
    assert reg.publish("adapters", "d01", dest) == "v0001"
    _intact(reg, "adapters", "d01", ["v0001"], {"latest": "v0001"})


def test_bundle_publish(registry, world):
    """``Registry.publish`` of a second d00 version killed before its manifest."""
    reg, root = registry
    code = f"""
from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.storage import open_fs
Registry(*open_fs({str(root)!r})).publish("adapters", "d00", {str(world['bundle'])!r})
"""
    _killed(code, "adapters/d00/v0002/manifest.json")
    _intact(reg, "adapters", "d00", ["v0001"], {"latest": "v0001", "production": "v0001"})
    assert reg.publish("adapters", "d00", world["bundle"]) == "v0003"
    _intact(reg, "adapters", "d00", ["v0001", "v0003"], {"latest": "v0003", "production": "v0001"})


def test_registry_index(registry, world):
    """Promotion killed while replacing ``aliases.json``: production stays, history stays whole."""
    reg, root = registry
    v2 = reg.publish("adapters", "d00", world["bundle"])
    history = reg.history("adapters", "d00")
    code = f"""
from mdlora.infra.artifacts.registry import Registry
from mdlora.infra.storage import open_fs
Registry(*open_fs({str(root)!r})).promote("adapters", "d00", {v2!r})
"""
    _killed(code, "adapters/d00/aliases.json")
    _intact(reg, "adapters", "d00", ["v0001", v2], {"latest": v2, "production": "v0001"})
    assert reg.history("adapters", "d00") == history
    assert reg.promote("adapters", "d00", v2) == "v0001"
    assert reg.aliases("adapters", "d00")["production"] == v2
