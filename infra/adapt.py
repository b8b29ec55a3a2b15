"""``mdlora adapt`` / ``mdlora add-domain``: per-domain LoRA on a published, frozen backbone.

Pipeline (the design is in README "Adapters"):

1. **Materialise once, sharded.** A Ray Train job (``dist.world_size`` gloo workers) builds the
   frozen backbone as pretraining shards it (:func:`mdlora.trainer.recipes.build_frozen`: any
   world size, no optimiser state) and runs ``Backbone.embed`` over its share of each split.
   Every rank writes its rows one file per (split, domain) into its Ray checkpoint, which Ray
   commits under ``output.run_dir`` (local, shared FS or s3://): the feature cache
   (:mod:`mdlora.infra.features`). No worker holds a full copy of the tables, and the driver
   reads only the ranks' row counts: no row passes through it.
2. **Train** in Ray tasks, each reading only its own domains' files from the cache. MLoRA:
   domains partitioned over ``train.tasks`` tasks (default one per CPU) with equal training
   rows, each domain trained independently (:func:`mdlora.trainer.adapt.train_mlora`);
   MultiLoRA: one joint task (shared aux LoRAs).
3. **Publish** one bundle per domain and promote it when the domain has no production yet; then
   remove the run's directory with its cache (``output.keep_features`` keeps it).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mdlora.adapters.config import LoraConfig
from mdlora.config import from_dict, to_dict
from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc
from mdlora.infra import features, ray_backend, tracking
from mdlora.infra.artifacts import (
    ADAPTERS,
    BackboneInfo,
    BundleManifest,
    Registry,
    open_backbone,
    open_bundles,
    write_bundle,
)
from mdlora.infra.features import FeatureCache
from mdlora.infra.log import setup_logging
from mdlora.infra.logs import LogDataset
from mdlora.infra.runs import (
    cache_dir,
    check_cpus,
    check_outputs,
    load_schema,
    remove_run,
    resolve_paths,
)
from mdlora.infra.storage import open_fs
from mdlora.progress import Progress, counted
from mdlora.trainer.adapt import (
    DomainResult,
    Head,
    materialise,
    train_mlora,
    train_multilora,
    wide_spec,
)
from mdlora.trainer.backbone import build_backbone
from mdlora.trainer.config import AdaptConfig, RunConfig, local_batch
from mdlora.trainer.recipes import build_frozen
from mdlora.trainer.rows import block_rows

log = logging.getLogger("mdlora.adapt")
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
    wide = wide_spec(schema, cfg.lora)

    def save(directory: Path) -> None:
        index: dict[str, int] = {}
        for i, source in enumerate(config["sources"]):
            for split, uri in source["splits"].items():
                data = LogDataset(uri, schema, window=cfg.data.window, domains=source["domains"])
                progress = Progress(f"materialise {split} (rank {env.rank})", data.num_rows() // env.world_size)
                feats = materialise(backbone, counted(data.iter_batches(
                    local, rank=env.rank, world_size=env.world_size, shuffle=False, drop_last=False,
                    prefetch=cfg.data.prefetch, converter=conv), progress), wide)
                progress.close()
                features.write_rank(directory, i, split, feats, schema.domain.values, env.rank, index)
        features.write_index(directory, env.rank, index, Head.of(backbone) if env.is_main else None)

    ray_backend.report({"rank": env.rank}, save)


def materialise_sources(cfg: AdaptConfig, backbone: BackboneInfo, schema: Schema, sources: list[Source],
                        name: str, width: int) -> tuple[FeatureCache, str]:
    """Run one sharded materialisation job over every source; returns where its features are
    (with each domain's rows per split; ``all`` splits divided 9:1) and the run's directory.
    ``width`` is E, the width of the backbone's embedding-layer output."""
    ray_backend.init_ray(cfg.dist.address)
    ray_backend.check_cluster(cfg.dist.world_size, cfg.dist.cpus_per_worker, cfg.dist.device)
    result = ray_backend.run_workers(
        materialise_worker,
        {"adapt": to_dict(cfg), "run": to_dict(backbone.run), "schema": schema.to_dict(),
         "backbone": str(backbone.path), "sources": [to_dict(src) for src in sources]},
        world_size=cfg.dist.world_size, device=cfg.dist.device, cpus_per_worker=cfg.dist.cpus_per_worker,
        max_failures=cfg.dist.max_failures, storage_path=cfg.output.run_dir, name=name, keep=1, local_copy=False)
    shutil.rmtree(result.workdir, ignore_errors=True)
    if result.uri is None:
        raise RuntimeError("materialisation finished without writing features")
    return features.read_index(result.uri, width, len(schema.aux)), result.run_uri


# ---- 2. train ---------------------------------------------------------------------------------


def _train_task(item: dict) -> tuple[list[DomainResult], dict]:
    """Ray task: read this task's domains' features from the cache and train them (module-level
    for pickling). MLoRA: each domain independently, its rows held when the task's rows fit in
    ``train.buffer_rows`` and streamed through that buffer otherwise; MultiLoRA: jointly (shared
    aux LoRAs; its mixed batches draw from every domain's rows, which are held)."""
    setup_logging()  # a Ray task: its progress lines reach the driver's output
    cache, cfg, vocab, wide = item["cache"], item["cfg"], item["vocab"], item["wide"]
    head = cache.head(item["head"])
    if item["aux"] is None and cache.held_rows(item["domains"]) > cfg.train.buffer_rows:
        with tempfile.TemporaryDirectory(prefix="mdlora-features-") as tmp:  # s3 files land here
            splits = cache.stream(item["domains"], vocab, cfg.loop.seed,
                                  block_rows(cfg.train.buffer_rows, cfg.train.batch_size, cfg.train.pack), Path(tmp))
            return train_mlora(head, cfg.lora, vocab, item["domains"], splits, cfg.train, cfg.loop, wide), {}
    splits = cache.load(item["domains"], cfg.loop.seed)
    if item["aux"] is None:
        return train_mlora(head, cfg.lora, vocab, item["domains"], splits, cfg.train, cfg.loop, wide), {}
    col, values = item["aux"]
    return train_multilora(head, cfg.lora, vocab, item["domains"], values, col, splits, cfg.train, cfg.loop,
                           item["shared"], wide)


def train_domains(cfg: AdaptConfig, head: Head, schema: Schema, domains: list[str], cache: FeatureCache,
                  shared: dict | None = None) -> tuple[list[DomainResult], dict]:
    """Train every domain's adapter in Ray tasks that read their own rows from ``cache``: MLoRA
    domains partitioned over ``train.tasks`` tasks (equal rows, largest first), MultiLoRA in one.
    ``head`` is the architecture; each task loads the frozen weights from the cache."""
    vocab = schema.domain.values
    base = {"cache": cache, "cfg": cfg, "vocab": vocab, "head": head, "aux": None, "shared": shared,
            "wide": wide_spec(schema, cfg.lora)}
    if cfg.lora.method == "multilora":
        aux = next((i for i, a in enumerate(schema.aux) if a.name == cfg.lora.aux), None)
        if aux is None:
            raise ValueError(f"lora.aux: {cfg.lora.aux!r} is not an aux division of the schema "
                             f"({[a.name for a in schema.aux]})")
        (out,) = ray_backend.map_tasks(_train_task, [base | {"domains": domains, "aux": (aux, schema.aux[aux].values)}])
        return out
    rows = {d: cache.rows.get(d, {}).get("train", 0) for d in domains}
    n = min(len(domains), cfg.train.tasks or ray_backend.available_cpus())
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for d in sorted(domains, key=lambda d: -rows[d]):  # greedy: equal rows per task
        k = int(np.argmin(load))
        groups[k].append(d)
        load[k] += rows[d]
    out = ray_backend.map_tasks(_train_task, [base | {"domains": g} for g in groups])
    by_domain = {r.domain: r for results, _ in out for r in results}
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
            written = write_bundle(Path(tmp) / r.domain, r.state, manifest, shared=shared)
            version = registry.publish(ADAPTERS, r.domain, Path(tmp) / r.domain)
            promoted = promote_new and "production" not in registry.aliases(ADAPTERS, r.domain)
            if promoted:
                registry.promote(ADAPTERS, r.domain, version)
            out[r.domain] = {"version": version, "promoted": promoted, "param_count": count,
                             "param_share": count / dense, "metrics": metrics,
                             "content_hash": written.content_hash, "path": registry.resolve(ADAPTERS, r.domain, version)}
            log.info("adapter %s %s%s: %s", r.domain, version, " (production)" if promoted else "", metrics)
    return out


def deployed(cfg: AdaptConfig, backbone: BackboneInfo) -> tuple[LoraConfig, dict] | None:
    """The LoRA config and MultiLoRA aux state (empty for MLoRA) of the production bundles that run
    on ``backbone`` (add-domain trains its domain to be served beside them), or None."""
    for bundle in open_bundles(cfg.output.root, backbone.name, None, _cache_dir(cfg)).values():
        # a bundle kept on another backbone version by a retrain's gate shares nothing with this one
        if bundle.manifest.backbone.content_hash == backbone.content_hash:
            return from_dict(LoraConfig, bundle.manifest.lora), bundle.shared
    return None


# ---- entry points -----------------------------------------------------------------------------


class NoTrainingRows(ValueError):
    """None of the domains to train has a training row (in ``data.window``)."""


def _run(cfg: AdaptConfig, backbone: BackboneInfo, schema: Schema, sources: list[Source],
         shared: dict | None, promote_new: bool = True, run: str = "", job: str = "adapt") -> dict:
    wide_spec(schema, cfg.lora)  # a bad lora.wide name fails here, before any worker starts
    t0 = time.time()
    name = f"adapt-{cfg.output.model}-{int(t0)}-{uuid.uuid4().hex[:8]}"  # concurrent jobs: own run dirs
    tags = {"mdlora.run_key": run, "mdlora.data_window": cfg.data.window or "all", "mdlora.method": cfg.lora.method,
            "mdlora.backbone_version": backbone.version, "mdlora.backbone_hash": backbone.content_hash,
            "mdlora.schema_hash": schema.content_hash()}
    with tracking.track(cfg.tracking, cfg.output, job=job, name=name, tags=tags) as tracker:
        tracker.params(cfg)
        out, histories = _train_and_publish(cfg, backbone, schema, sources, shared, promote_new, run, name)
        out["seconds"]["total"] = round(time.time() - t0, 2)
        _track(tracker, out, histories)
    return out


def _train_and_publish(cfg: AdaptConfig, backbone: BackboneInfo, schema: Schema, sources: list[Source],
                       shared: dict | None, promote_new: bool, run: str, name: str) -> tuple[dict, dict]:
    """Materialise, train, publish: the summary :func:`adapt` returns, and each trained domain's
    validation score after every evaluation."""
    t0 = time.time()
    model = build_backbone(schema, backbone.run.model, build_ebc(schema, "meta"))
    head = Head.of(model)  # the architecture: the tasks load its frozen weights from the cache
    cache, run_dir = materialise_sources(cfg, backbone, schema, sources, name, model.input_dim)
    domains = [d for src in sources for d in src.domains]
    t1 = time.time()
    counts = {d: cache.rows.get(d, {}).get("train", 0) for d in domains}
    empty = sorted(d for d, n in counts.items() if n == 0)
    trained = [d for d in domains if counts[d] > 0]
    if not trained:
        raise NoTrainingRows(f"no training rows for any of the domains {domains} in "
                             f"{[src.splits for src in sources]}"
                             + (f" in the window {cfg.data.window}" if cfg.data.window else ""))
    results, shared_out = train_domains(cfg, head, schema, trained, cache, shared)
    t2 = time.time()
    windows = {d: {"window": cfg.data.window or "all", **src.splits} for src in sources for d in src.domains}
    bundles = publish(cfg, backbone, schema, head, results, shared_out if shared is None else shared, windows,
                      promote_new, run)
    if not cfg.output.keep_features:  # published: the cache has served its purpose
        remove_run(run_dir)
    return {"backbone": {"name": backbone.name, "version": backbone.version, "content_hash": backbone.content_hash},
            "method": cfg.lora.method, "bundles": bundles, "skipped_no_rows": empty,
            "rows": {s: cache.count(s) for s in features.SPLITS if cache.count(s) or s == "train"},
            "seconds": {"materialise": round(t1 - t0, 2), "train": round(t2 - t1, 2)}}, \
        {r.domain: r.history for r in results}


def _track(tracker: tracking.Tracker, out: dict, histories: dict[str, list[float | None]]) -> None:
    """Per domain: the validation score of every evaluation (step = evaluation number), the final
    metrics per split, parameter counts, and the published bundle's registry links."""
    for d, b in out["bundles"].items():
        for i, score in enumerate(histories.get(d, []), 1):
            tracker.metrics({f"val/{d}/score": score}, step=i)
        tracker.metrics({f"adapter/{d}/param_count": b["param_count"], f"adapter/{d}/param_share": b["param_share"]}
                        | tracking.per_domain_splits(d, b["metrics"]))
        tracker.tags({f"mdlora.adapter.{d}.version": b["version"], f"mdlora.adapter.{d}.hash": b["content_hash"],
                      f"mdlora.adapter.{d}.path": b["path"]})
    tracker.metrics({"seconds/" + k: v for k, v in out["seconds"].items()}
                    | {f"rows/{s}": n for s, n in out["rows"].items()})


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
            run on this backbone (or trains one when there are none). When such bundles exist,
            their LoRA config replaces ``cfg.lora`` (with a warning where it differs), so that
            the new domain is served beside them.

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
    found = deployed(cfg, backbone)
    if found is not None:  # one LoRA config per backbone, as scoring serves them
        lora, deployed_shared = found
        if lora != cfg.lora:
            log.warning("add-domain %s: trains with the LoRA config of the production bundles on backbone %s %s "
                        "(%s), not lora %s, to be served beside them", domain, backbone.version, lora.method,
                        to_dict(lora), to_dict(cfg.lora))
            cfg = replace(cfg, lora=lora)
        if shared is None and lora.method == "multilora":
            shared = deployed_shared
    return _run(cfg, backbone, schema, [Source(splits, [domain])], shared, promote_new, run, job="add-domain")

