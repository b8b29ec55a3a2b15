"""Mixed-domain scoring throughput: per-row adapters vs the backbone alone, through ``Scorer``.

Set-up (untimed): the reference schema with ``domains`` natural domains; a backbone built and
checkpointed by mdlora's own recipe (``setup_pretrain`` in a 1-rank gloo group,
``Setup.save``) and published with ``mdlora.infra.pretrain.publish_backbone``; one MLoRA bundle per
domain (default LoRA config, every factor random so no update is zero) written with
``mdlora.infra.artifacts.bundle.write_bundle`` and promoted to production in the registry.

Timed: :meth:`mdlora.infra.score.Scorer.score_table` on the same N mixed-domain rows (an Arrow table in
memory: conversion + lookups + tower + routing, no Parquet I/O) by a Scorer holding every
domain's production bundle and by one holding none (``bundles={}``: the plain backbone).
The two are run in alternating order ``repeat`` times (ABBA), one torch thread; rows/s = rows x
runs / summed seconds, wall and CPU (one thread: Arrow and torch pinned to 1, so CPU seconds
are the per-core cost, immune to a loaded machine); the ratio adapters / backbone of rows per CPU
second is the figure (goal >= ``GOAL``).
The adapter runs are sampled by py-spy (:mod:`benchmarks.profiling`) to name the bottleneck.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.common import Reference, write_reference_parquet
from benchmarks.profiling import bottleneck, profile_self

GOAL = 0.8


def publish_fixture(work: Path, ref: Reference, rows: int) -> tuple[str, str, Path]:
    """Data, a published backbone and one production bundle per domain -> (root, model, data)."""
    from benchmarks.scaling import one_rank_group
    from mdlora.adapters.config import LoraConfig
    from mdlora.adapters.inject import inject
    from mdlora.config import to_dict
    from mdlora.embeddings.schema import Schema
    from mdlora.infra.artifacts import open_backbone, publish_backbone
    from mdlora.infra.artifacts.bundle import BundleManifest, write_bundle
    from mdlora.infra.artifacts.registry import Registry
    from mdlora.infra.storage import open_fs
    from mdlora.trainer.config import RunConfig
    from mdlora.trainer.env import DistEnv
    from mdlora.trainer.loop import TrainState
    from mdlora.trainer.recipes import load_unsharded, setup_pretrain

    train, schema_path = write_reference_parquet(work / "data", ref, n=rows)
    schema = Schema.load(schema_path)
    cfg = RunConfig()
    cfg.data.schema, cfg.data.train, cfg.model.hidden = (
        str(schema_path),
        str(train),
        list(ref.hidden),
    )
    cfg.output.root, cfg.output.model = str(work / "registry"), "score"
    with one_rank_group():
        setup = setup_pretrain(cfg, DistEnv(), schema, 1)
        setup.save(work / "ckpt", TrainState())
    publish_backbone(cfg, schema, work / "ckpt")
    info = open_backbone(cfg.output.root, "score", "production", work / "cache")
    lora, domains = LoraConfig(), schema.domain.values
    backbone = load_unsharded(info.path, info.schema, info.run.model).backbone
    adapted = inject(backbone, lora, domains, None, root="tower")
    registry = Registry(*open_fs(cfg.output.root))
    g = torch.Generator().manual_seed(0)
    dense = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("embeddings"))
    for d in domains:
        state = {
            k: torch.randn(v.shape, generator=g) * 0.05 for k, v in adapted.state_for(d).items()
        }
        count = sum(v.numel() for v in state.values())
        manifest = BundleManifest(
            domain=d,
            method="mlora",
            lora=to_dict(lora),
            backbone=info.ref(),
            schema_hash=info.schema.content_hash(),
            param_count=count,
            param_share=count / dense,
        )
        write_bundle(work / "bundles" / d, state, manifest)
        registry.promote("adapters", d, registry.publish("adapters", d, work / "bundles" / d))
    return cfg.output.root, "score", train


def run(work: Path, quick: bool, repeat: int | None = None) -> dict:
    """Build the fixture, time both scorers on the same rows, return the figures."""
    from mdlora.infra.score import Scorer

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    ref = Reference(rows=10_000 if quick else 100_000, domains=16)
    rows = 20_000 if quick else 200_000
    repeat = repeat or (2 if quick else 4)
    root, model, data = publish_fixture(work, ref, rows)
    table = pq.read_table(data)
    with tempfile.TemporaryDirectory(prefix="mdlora-score-cache-") as cache:
        scorers = {
            "adapters": Scorer(root, model, cache_dir=Path(cache) / "a"),
            "backbone": Scorer(root, model, bundles={}, cache_dir=Path(cache) / "b"),
        }
        probs = {k: s.score_table(table) for k, s in scorers.items()}  # warm-up, and a check
        secs, cpu = dict.fromkeys(scorers, 0.0), dict.fromkeys(scorers, 0.0)
        with profile_self(work / "scoring.raw") as prof:
            for i in range(repeat):
                for k in scorers if i % 2 == 0 else reversed(list(scorers)):
                    t0, c0 = time.perf_counter(), time.process_time()
                    scorers[k].score_table(table)
                    secs[k] += time.perf_counter() - t0
                    cpu[k] += time.process_time() - c0
    rate = {k: table.num_rows * repeat / s for k, s in secs.items()}
    per_cpu = {k: table.num_rows * repeat / s for k, s in cpu.items()}
    ratio = per_cpu["adapters"] / per_cpu["backbone"]
    return {
        "rows": table.num_rows,
        "domains": ref.domains,
        "repeat": repeat,
        "threads": 1,
        "rows_per_s": rate,
        "rows_per_cpu_s": per_cpu,
        "seconds": secs,
        "ratio_adapters_vs_backbone": ratio,
        "target": f">= {GOAL}",
        "met": ratio >= GOAL,
        "adapters_loaded": len(scorers["adapters"].versions),
        "adapters_change_scores": bool((probs["adapters"] != probs["backbone"]).any()),
        "profile": prof["summary"],
        "bottleneck": bottleneck(prof["summary"]),
    }
