"""``mdlora adapt`` / ``mdlora add-domain``: per-domain LoRA on a published, frozen backbone.

Pipeline (the design is in README "Adapters"):

1. **Materialise once, sharded.** A Ray Train job (``dist.world_size`` gloo workers) builds the
   backbone exactly as pretraining does (meta EBC -> plan -> DMP; fused optimiser ``sgd``, so no
   optimiser state), loads the published DCP shards (any world size), and runs the frozen
   ``Backbone.embed`` over its share of each split. Every rank writes ``<split>-rank<r>``
   safetensors (x [n, E] f32, labels, domains, aux) into its Ray checkpoint; Ray commits the
   ranks' files as one checkpoint under ``output.run_dir`` (the feature cache). Rank 0 also
   writes the head (tower + output) weights. No worker holds a full copy of the tables.
2. **Train.** MLoRA: domains are partitioned over Ray tasks (``train.tasks``, default one per
   CPU), each training its domains independently (:func:`mdlora.trainer.adapt.train_mlora`).
   MultiLoRA: one joint run (shared aux LoRAs).
3. **Publish** one bundle per domain and promote it when the domain has no production yet.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mdlora.config import from_dict, to_dict
from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc
from mdlora.infra import ray_backend
from mdlora.infra.artifacts import (
    ADAPTERS,
    BackboneInfo,
    BundleManifest,
    Registry,
    open_backbone,
    open_bundles,
    write_bundle,
)
from mdlora.infra.logs import LogDataset
from mdlora.infra.runs import cache_dir, check_cpus, check_outputs, load_schema, resolve_paths
from mdlora.infra.storage import open_fs
from mdlora.trainer.adapt import DomainResult, Features, Head, materialise, train_mlora, train_multilora
from mdlora.trainer.backbone import build_backbone
from mdlora.trainer.config import AdaptConfig, RunConfig, local_batch
from mdlora.trainer.recipes import build_frozen

log = logging.getLogger("mdlora.adapt")
HEAD = "head.safetensors"  # the feature cache's frozen head (a run file, not published)
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")  # buffers, not parameters


def _schema(cfg: AdaptConfig, backbone: BackboneInfo) -> Schema:
    """The run's schema (``data.schema`` or the backbone's), checked against the backbone's hash."""
    schema = load_schema(cfg.data.schema) if cfg.data.schema else backbone.schema
    if schema.content_hash() != backbone.schema.content_hash():
        raise ValueError(f"{cfg.data.schema}: schema hash {schema.content_hash()[:12]} differs from backbone "
                         f"{backbone.name} {backbone.version} ({backbone.schema.content_hash()[:12]})")
    return schema


# ---- 1. materialise (Ray Train workers) --------------------------------------------------------


@dataclass
class Source:
    """Log datasets by split and the domains read from them; one materialisation reads several
    (a scheduled retrain: the main logs for the schema's domains, and each domain added by
    ``add-domain`` from its own logs)."""

    splits: dict[str, str]
    """``{"train", "validation", "test"}`` -> dataset (train required), or ``{"all": dataset}``:
    one dataset whose rows are split 9:1 into train/validation by ``loop.seed``."""
    domains: list[str]
    """The domains whose rows are read from these datasets."""


def materialise_worker(config: dict) -> None:
    """One Ray Train worker: sharded frozen backbone -> this rank's features of every source's splits."""
    cfg = from_dict(AdaptConfig, config["adapt"])
    env = ray_backend.worker_env(cfg.dist.device)
    torch.set_num_threads(cfg.dist.cpus_per_worker)
    schema = Schema.from_dict(config["schema"])
    backbone = build_frozen(from_dict(RunConfig, config["run"]), cfg.dist, env, schema, config["backbone"],
                            cfg.data.batch_size)
    conv, local = BatchConverter(schema), local_batch(cfg.data.batch_size, env.world_size)

    def save(directory: Path) -> None:
        for i, source in enumerate(config["sources"]):
            for split, uri in source["splits"].items():
                data = LogDataset(uri, schema, window=cfg.data.window, domains=source["domains"])
                feats = materialise(backbone, data.iter_batches(
                    local, rank=env.rank, world_size=env.world_size, shuffle=False, drop_last=False,
                    prefetch=cfg.data.prefetch, converter=conv))
                save_file(dict(zip(("x", "labels", "domains", "aux"), feats.tensors(), strict=True)),
                          str(directory / f"s{i}-{split}-rank{env.rank:05d}.safetensors"))
        if env.is_main:
            save_file(Head.of(backbone).state_dict(), str(directory / HEAD))

    ray_backend.report({"rank": env.rank}, save)


def load_features(directory: Path, split: str, width: int, aux: int) -> Features:
    """Concatenate the ranks' cached features of one split (rank order)."""
    parts = [Features(*(load_file(str(p))[k] for k in ("x", "labels", "domains", "aux")))
             for p in sorted(directory.glob(f"{split}-rank*.safetensors"))]
    return Features.cat(parts, width, aux)


def materialise_sources(cfg: AdaptConfig, backbone: BackboneInfo, schema: Schema, sources: list[Source],
                        name: str) -> tuple[dict[str, Features], Head]:
    """Run one sharded materialisation job over every source; returns the features per split
    (``train``, ``validation``, ``test``: the sources' rows together, ``all`` splits divided 9:1)
    and the frozen head."""
    ray_backend.init_ray(cfg.dist.address)
    ray_backend.check_cluster(cfg.dist.world_size, cfg.dist.cpus_per_worker, cfg.dist.device)
    result = ray_backend.run_workers(
        materialise_worker,
        {"adapt": to_dict(cfg), "run": to_dict(backbone.run), "schema": schema.to_dict(),
         "backbone": str(backbone.path), "sources": [to_dict(src) for src in sources]},
        world_size=cfg.dist.world_size, device=cfg.dist.device, cpus_per_worker=cfg.dist.cpus_per_worker,
        max_failures=cfg.dist.max_failures, storage_path=cfg.output.run_dir, name=name, keep=1)
    try:
        if result.checkpoint is None:
            raise RuntimeError("materialisation finished without writing features")
        model = build_backbone(schema, backbone.run.model, build_ebc(schema, "meta"))
        head = Head.of(model)
        head.load_state_dict(load_file(str(result.checkpoint / HEAD)))
        width, aux = model.input_dim, len(schema.aux)
        parts = []
        for i, src in enumerate(sources):
            feats = {s: load_features(result.checkpoint, f"s{i}-{s}", width, aux) for s in src.splits}
            parts.append(feats["all"].split(cfg.loop.seed) if "all" in feats else feats)
        names = [s for s in ("train", "validation", "test") if any(s in p for p in parts)]
        return {s: Features.cat([p[s] for p in parts if s in p], width, aux) for s in names}, head
    finally:
        shutil.rmtree(result.workdir, ignore_errors=True)


# ---- 2. train ---------------------------------------------------------------------------------


def _mlora_task(item: dict) -> list[DomainResult]:
    """Ray task: train a partition of the MLoRA domains (module-level for pickling)."""
    return train_mlora(item["head"], item["lora"], item["vocab"], item["domains"], item["splits"],
                       item["train"], item["loop"])


def train_domains(cfg: AdaptConfig, head: Head, schema: Schema, domains: list[str],
                  splits: dict[str, Features], shared: dict | None = None) -> tuple[list[DomainResult], dict]:
    """Train every domain's adapter; MLoRA domains over parallel Ray tasks (largest first)."""
    vocab = schema.domain.values
    if cfg.lora.method == "multilora":
        aux = next((i for i, a in enumerate(schema.aux) if a.name == cfg.lora.aux), None)
        if aux is None:
            raise ValueError(f"lora.aux: {cfg.lora.aux!r} is not an aux division of the schema "
                             f"({[a.name for a in schema.aux]})")
        return train_multilora(head, cfg.lora, vocab, domains, schema.aux[aux].values, aux, splits,
                               cfg.train, cfg.loop, shared)
    rows = {d: int((splits["train"].domains == vocab.index(d)).sum()) for d in domains}
    n = min(len(domains), cfg.train.tasks or ray_backend.available_cpus())
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for d in sorted(domains, key=lambda d: -rows[d]):  # greedy: equal rows per task
        k = int(np.argmin(load))
        groups[k].append(d)
        load[k] += rows[d]
    items = []
    for group in groups:
        ids = torch.tensor([vocab.index(d) for d in group])
        part = {s: f.select(torch.isin(f.domains, ids)) for s, f in splits.items()}
        items.append({"head": head, "lora": cfg.lora, "vocab": vocab, "domains": group, "splits": part,
                      "train": cfg.train, "loop": cfg.loop})
    out = [_mlora_task(items[0])] if n == 1 else ray_backend.map_tasks(_mlora_task, items)
    by_domain = {r.domain: r for results in out for r in results}
    return [by_domain[d] for d in domains], {}


# ---- 3. publish -------------------------------------------------------------------------------


def _clean(metrics: dict) -> dict:
    return {s: {k: float(v) for k, v in m.items() if v is not None} for s, m in metrics.items()}


def publish(cfg: AdaptConfig, backbone: BackboneInfo, schema: Schema, head: Head, results: list[DomainResult],
            shared: dict, windows: dict[str, dict[str, str]], promote_new: bool = True, run: str = "") -> dict[str, dict]:
    """One bundle per domain into the registry; promote where a domain has no production yet
    (unless ``promote_new`` is False: then no alias but ``latest`` moves). ``run`` is recorded in
    each manifest (a scheduled retrain's run key)."""
    registry = Registry(*open_fs(cfg.output.root))
    dense = head.param_count()
    lora = to_dict(cfg.lora)
    out = {}
    with tempfile.TemporaryDirectory(prefix="mdlora-bundles-") as tmp:
        for r in results:
            count = sum(t.numel() for k, t in r.state.items() if not k.endswith(_BN_STATS))
            metrics = _clean(r.metrics) | {"train": {"samples": float(r.train_samples),
                                                     "best_epoch": float(r.best_epoch),
                                                     "epochs_run": float(r.epochs_run),
                                                     "validations": float(len(r.history))}
                                          | ({} if r.confidence is None else {"gain_confidence": r.confidence})}
            manifest = BundleManifest(
                domain=r.domain, method=cfg.lora.method, lora=lora, backbone=backbone.ref(),
                schema_hash=schema.content_hash(), param_count=count, param_share=count / dense,
                metrics=metrics, data_window=windows[r.domain], run=run)
            write_bundle(Path(tmp) / r.domain, r.state, manifest, shared=shared)
            version = registry.publish(ADAPTERS, r.domain, Path(tmp) / r.domain)
            promoted = promote_new and "production" not in registry.aliases(ADAPTERS, r.domain)
            if promoted:
                registry.promote(ADAPTERS, r.domain, version)
            out[r.domain] = {"version": version, "promoted": promoted, "param_count": count,
                             "param_share": count / dense, "metrics": metrics}
            log.info("adapter %s %s%s: %s", r.domain, version, " (production)" if promoted else "", metrics)
    return out


def production_shared(cfg: AdaptConfig, backbone: BackboneInfo) -> dict | None:
    """MultiLoRA aux state of a deployed production bundle (add-domain keeps it frozen), or None."""
    for bundle in open_bundles(cfg.output.root, backbone.name, None, _cache_dir(cfg)).values():
        # a bundle kept on another backbone version by a retrain's gate shares nothing with this one
        if bundle.manifest.backbone.content_hash == backbone.content_hash and bundle.manifest.method == "multilora":
            return bundle.shared
    return None


# ---- entry points -----------------------------------------------------------------------------


class NoTrainingRows(ValueError):
    """None of the domains to train has a training row (in ``data.window``)."""


def _run(cfg: AdaptConfig, backbone: BackboneInfo, schema: Schema, sources: list[Source],
         shared: dict | None, promote_new: bool = True, run: str = "") -> dict:
    t0 = time.time()
    name = f"adapt-{cfg.output.model}-{int(t0)}-{uuid.uuid4().hex[:8]}"  # concurrent jobs: own run dirs
    feats, head = materialise_sources(cfg, backbone, schema, sources, name)
    domains = [d for src in sources for d in src.domains]
    t1 = time.time()
    counts = {d: int((feats["train"].domains == schema.domain.index(d)).sum()) for d in domains}
    empty = sorted(d for d, n in counts.items() if n == 0)
    trained = [d for d in domains if counts[d] > 0]
    if not trained:
        raise NoTrainingRows(f"no training rows for any of the domains {domains} in "
                             f"{[src.splits for src in sources]}"
                             + (f" in the window {cfg.data.window}" if cfg.data.window else ""))
    results, shared_out = train_domains(cfg, head, schema, trained, feats, shared)
    t2 = time.time()
    windows = {d: {"window": cfg.data.window or "all", **src.splits} for src in sources for d in src.domains}
    bundles = publish(cfg, backbone, schema, head, results, shared_out if shared is None else shared, windows,
                      promote_new, run)
    return {"backbone": {"name": backbone.name, "version": backbone.version, "content_hash": backbone.content_hash},
            "method": cfg.lora.method, "bundles": bundles, "skipped_no_rows": empty,
            "rows": {s: len(f) for s, f in feats.items()},
            "seconds": {"materialise": round(t1 - t0, 2), "train": round(t2 - t1, 2), "total": round(time.time() - t0, 2)}}


def _cache_dir(cfg: AdaptConfig) -> Path:
    """Local directory for artefacts fetched from an S3 registry (unused for local ones)."""
    return cache_dir(cfg.output.run_dir)


def _prepare(cfg: AdaptConfig) -> tuple[AdaptConfig, BackboneInfo]:
    cfg = resolve_paths(cfg)
    check_cpus(cfg.dist)  # before Ray starts: an embedded Ray would wait forever
    check_outputs(cfg.output.root, cfg.output.run_dir)  # the bundles are published there after training
    return cfg, open_backbone(cfg.output.root, cfg.output.model, cfg.output.backbone, _cache_dir(cfg))


def adapt(cfg: AdaptConfig, domains: list[str] | None = None, *, added: dict[str, dict[str, str]] | None = None,
          promote_new: bool = True, run: str = "", shared: dict | None = None) -> dict:
    """Train and publish adapters of ``domains`` (default ``data.domains``, else every domain).

    Args:
        cfg: the adapt config.
        domains: the domains to train from ``data``'s logs (names of the backbone schema's
            vocabulary); None: the default above.
        added: domains outside the vocabulary (added by ``add-domain``) trained in the same run,
            each from its own datasets (:attr:`Source.splits`, as its bundle records them): one
            materialisation reads them all (a scheduled retrain's rebase).
        promote_new: False publishes without promoting domains that have no production bundle
            yet (a scheduled retrain promotes only after its gate).
        run: recorded in every manifest (a scheduled retrain's run key).
        shared: MultiLoRA: a frozen aux LoRA state to train against (a resumed retrain's first
            bundles'); None trains it jointly.

    Returns:
        ``{"backbone", "method", "bundles": {domain: {"version", ...}}, "skipped_no_rows", "rows",
        "seconds"}``.
    """
    cfg, backbone = _prepare(cfg)
    schema = _schema(cfg, backbone)
    domains = list(domains if domains is not None else cfg.data.domains or schema.domain.values)
    for d in domains:
        schema.domain.index(d)  # ValueError naming an unknown domain
    splits = {"train": cfg.data.train} | ({"validation": cfg.data.val} if cfg.data.val else {}) \
        | ({"test": cfg.data.test} if cfg.data.test else {})
    added = added or {}
    sources = ([Source(splits, domains)] if domains else []) + [Source(sp, [d]) for d, sp in sorted(added.items())]
    if not sources:
        raise ValueError("adapt: no domains to train")
    return _run(cfg, backbone, schema.with_domains(sorted(added)), sources, shared, promote_new, run)


def domain_splits(data: str) -> dict[str, str]:
    """The datasets of a new domain's logs at ``data``: its ``train/`` (+ ``val/``, ``test/``)
    subdirectories as ``{"train", "validation", "test"}``, or ``{"all": data}`` (one dataset).

    Raises:
        FileNotFoundError: ``data`` does not exist.
    """
    data = data if "://" in data else str(Path(data).resolve())
    fs, path = open_fs(data)
    if not fs.exists(path):
        raise FileNotFoundError(f"{data}: no such dataset")
    sub = {s: f"{data}/{d}" for s, d in (("train", "train"), ("validation", "val"), ("test", "test"))
           if fs.exists(f"{path}/{d}")}
    return sub if "train" in sub else {"all": data}


def add_domain(cfg: AdaptConfig, domain: str, data: str | dict[str, str], *, promote_new: bool = True,
               run: str = "", shared: dict | None = None) -> dict:
    """Train and publish the adapter of one new domain from its logs.

    The domain vocabulary is extended by ``domain``; no other bundle and not the backbone is
    written.

    Args:
        cfg: the adapt config (``output.backbone``: the backbone to train on).
        domain: the new domain's name.
        data: a directory with ``train/`` (+ optional ``val/``, ``test/``), or one dataset whose
            rows are split 9:1 into train/validation by ``loop.seed``; or those datasets by split
            as :func:`domain_splits` returns them (and bundles record them).
        promote_new: as in :func:`adapt`.
        run: as in :func:`adapt`.
        shared: MultiLoRA: the frozen aux LoRA state; None takes the production bundles' that
            run on this backbone (or trains one when there are none).

    Returns:
        As :func:`adapt`.

    Raises:
        FileNotFoundError: a dataset does not exist.
        NoTrainingRows: the domain has no training row (in ``data.window``).
    """
    cfg, backbone = _prepare(cfg)
    schema = _schema(cfg, backbone).with_domains([domain])
    splits = domain_splits(data) if isinstance(data, str) else data
    for uri in splits.values():
        fs, path = open_fs(uri)
        if not fs.exists(path):
            raise FileNotFoundError(f"{uri}: no such dataset")
    if shared is None and cfg.lora.method == "multilora":
        shared = production_shared(cfg, backbone)
    return _run(cfg, backbone, schema, [Source(splits, [domain])], shared, promote_new, run)

