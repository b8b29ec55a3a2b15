"""Shared pieces of the reliability suite: tiny logs, a real backbone and bundle without Ray,
and a runner for the ``mdlora`` CLI in a separate process (so that a SIGKILL is a real one).

The backbone is the real artefact ``mdlora pretrain`` publishes (DCP shards, schema, config,
manifest), written by :func:`mdlora.infra.pretrain.publish_backbone` from untrained weights: the
faults tested here are about files, not about learning, and need no Ray start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-SENTINEL-do-not-log-7f3a"
"""Sentinel S3 secret key: it must never appear in any output of a run."""


def cli(args: list[str], *, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``mdlora ARGS`` in a new Python process; returns the completed process (text)."""
    return py_argv(["-m", "mdlora.jobs.cli", *args], env=env, timeout=timeout)


def py(code: str, *, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a Python snippet in a new process (the real writers, for crash and outage tests)."""
    return py_argv(["-c", code], env=env, timeout=timeout)


def py_argv(argv: list[str], *, env: dict | None, timeout: float) -> subprocess.CompletedProcess:
    """``python ARGV`` in the repository root with ``env`` added to this process's environment."""
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def adapt_overrides(logs: Path, root: Path) -> list[str]:
    """``--set`` overrides of a tiny adapt / add-domain / score run on ``logs`` against ``root``."""
    return [f"data.schema={logs}/schema.yaml", f"data.train={logs}/train", f"data.val={logs}/val",
            "data.batch_size=256", "dist.world_size=1", f"output.root={root}", "output.model=ctr"]


def run_overrides(logs: Path, root: Path) -> list[str]:
    """``--set`` overrides of a tiny pretrain run on ``logs`` publishing to ``root``."""
    return adapt_overrides(logs, root) + ["model.hidden=[16,8]"]


def sets(overrides: list[str]) -> list[str]:
    """``["--set", o1, "--set", o2, ...]``."""
    return [a for o in overrides for a in ("--set", o)]


def publish_untrained_backbone(logs: Path, root: Path) -> dict:
    """Publish a real (untrained) ``ctr`` backbone of the ``logs`` schema into the registry at ``root``."""
    import tempfile

    from mdlora.atomic import write_json
    from mdlora.embeddings.checkpoint import write_shards
    from mdlora.embeddings.tables import build_ebc
    from mdlora.infra.artifacts import publish_backbone
    from mdlora.infra.runs import load_schema, resolve_paths
    from mdlora.trainer.backbone import build_backbone
    from mdlora.trainer.config import load_run_config
    from mdlora.trainer.loop import TrainState
    from mdlora.trainer.recipes import PLAN_FILE, STATE_FILE
    from mdlora.trainer.task import CTRTask

    cfg = resolve_paths(load_run_config(None, run_overrides(logs, root)))
    schema = load_schema(cfg.data.schema)
    with tempfile.TemporaryDirectory(prefix="mdlora-bb-") as tmp:
        ckpt = Path(tmp) / "checkpoint"
        task = CTRTask(build_backbone(schema, cfg.model, build_ebc(schema, device="cpu")))
        write_shards(ckpt, task, None)
        write_json(ckpt / STATE_FILE, TrainState(step=1).to_dict())
        write_json(ckpt / PLAN_FILE, {})
        return publish_backbone(cfg, schema, ckpt)


def write_test_bundle(dest: Path, backbone: dict, domain: str) -> None:
    """A real adapter bundle for ``domain`` on ``backbone`` (LoRA B random so that it matters)."""
    import torch

    from mdlora.adapters.config import LoraConfig
    from mdlora.adapters.inject import inject
    from mdlora.config import to_dict
    from mdlora.embeddings.schema import Schema
    from mdlora.embeddings.tables import build_ebc
    from mdlora.infra.artifacts.bundle import BackboneRef, BundleManifest, write_bundle
    from mdlora.trainer.backbone import build_backbone
    from mdlora.trainer.config import ModelConfig

    schema = Schema.load(Path(backbone["path"]) / "schema.yaml").with_domains([domain])
    torch.manual_seed(0)
    model = build_backbone(schema, ModelConfig(hidden=[16, 8]), build_ebc(schema, device="cpu"))
    lora = LoraConfig(alpha=4)
    adapted = inject(model, lora, [domain], None, root="tower")
    state = {k: torch.randn_like(v) for k, v in adapted.state_for(domain).items()}
    manifest = BundleManifest(
        domain=domain, method="mlora", lora=to_dict(lora), schema_hash=schema.content_hash(),
        backbone=BackboneRef(name="ctr", version=backbone["version"], content_hash=backbone["content_hash"]),
        param_count=sum(t.numel() for t in state.values()), param_share=0.01)
    write_bundle(dest, state, manifest)


@pytest.fixture(scope="session")
def tiny_logs(tmp_path_factory) -> Path:
    """3 domains (d00..d02) + 1 held-out (d03), 2 days, ~4k rows: seconds to write."""
    from mdlora.infra.synth import generate

    out = tmp_path_factory.mktemp("rel-logs") / "synth"
    generate(str(out), rows=4000, domains=4, holdout_domains=1, seed=11, users=300, items=300, days=2)
    return out


@pytest.fixture(scope="session")
def world(tiny_logs, tmp_path_factory) -> dict:
    """A registry with backbone ``ctr`` v0001 (production) and adapter ``d00`` v0001 (production)."""
    from mdlora.infra.artifacts.registry import Registry
    from mdlora.infra.storage import open_fs

    root = tmp_path_factory.mktemp("rel-world") / "registry"
    backbone = publish_untrained_backbone(tiny_logs, root)
    bundle = tmp_path_factory.mktemp("rel-bundle") / "d00"
    write_test_bundle(bundle, backbone, "d00")
    registry = Registry(*open_fs(str(root)))
    registry.promote("adapters", "d00", registry.publish("adapters", "d00", bundle))
    return {"logs": tiny_logs, "root": root, "backbone": backbone, "bundle": bundle}
