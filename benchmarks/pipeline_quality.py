"""Quality through the production pipeline: ``pretrain`` -> ``adapt`` -> ``score``, as shipped.

The quality harness (:mod:`benchmarks.quality`) trains every method in one process with plain
Adam. This benchmark instead runs what users run, through the functions the CLI calls: Ray Train
workers with TorchRec-sharded tables and fused rowwise Adagrad (:func:`mdlora.infra.pretrain.pretrain`),
per-domain adapters on the frozen, published backbone with the no-negative-transfer gate
(:func:`mdlora.infra.adapt.adapt`), and routed scoring of the test split
(:class:`mdlora.infra.score.Scorer`), once with no bundle (the backbone alone) and once with every
domain's production bundle.

Per domain (:mod:`benchmarks.pipeline_quality_stats`): test AUC and LogLoss of both, and a paired bootstrap of the
AUC gain on the domain's test rows (resampled within the domain, positives and negatives apart,
the same rows for both models): mean gain, 95 % interval, one-sided p for "adapters > backbone",
and the class above (p < 0.05) / below (p > 0.95) / equal. The gate's confidence and decision
come from each published bundle's manifest. Cells are data seeds x training seeds; the summary
gives mean ± sd over cells (:mod:`benchmarks.pipeline_quality_report`).

Data: ``synthetic`` (``gen-logs``: :func:`mdlora.infra.synth.generate`, generated under ``--work``
per data seed, or an existing gen-logs directory ``--path``) or MovieLens (``import-movielens``
of the source directory ``--path``, read in place, imported under ``--work`` per data seed,
which is the split seed).

Usage::

    python -m benchmarks.pipeline_quality --dataset synthetic --rows 300000 --domains 5 --seeds 1
    python -m benchmarks.pipeline_quality --dataset movielens-1m --path ../shared/data/movielens-1m
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, write_results
from benchmarks.pipeline_quality_stats import compare, gate_of

NAMES = {"synthetic": "synthetic", "movielens-1m": "ml1m", "movielens-100k": "ml100k"}
MODEL = "pq"
"""Backbone name in each cell's registry."""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ---------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, data_seed: int, work: Path) -> dict:
    """The log datasets of one data seed: ``{"schema", "train", "val", "test", "source"}``.

    Synthetic: ``--path`` as is when it holds a gen-logs output, else generated under ``work``.
    MovieLens: ``--path`` (the source, never copied) imported under ``work`` with split seed
    ``data_seed``.
    """
    from mdlora.infra.movielens import import_movielens
    from mdlora.infra.synth import generate

    if args.dataset == "synthetic" and args.path:
        root = Path(args.path).resolve()
        source = {"dataset": "synthetic", "path": str(root), "generated": False}
    else:
        root = work / f"data-{data_seed}"
        if args.dataset == "synthetic":
            gen = {
                "rows": args.rows,
                "domains": args.domains,
                "users": args.users,
                "items": args.items,
                "days": args.days,
                "seed": data_seed,
                "shifts": args.shifts,
            }
            _log(f"gen-logs {gen} -> {root}")
            generate(str(root), **gen)
            source = {"dataset": "synthetic", "generate": gen, "generated": True}
        else:
            _log(f"import-movielens {args.path} (split seed {data_seed}) -> {root}")
            stats = import_movielens(args.path, str(root), seed=data_seed)
            source = {
                "dataset": args.dataset,
                "path": str(Path(args.path).resolve()),
                "split_seed": data_seed,
                "layout": stats["layout"],
                "rows": stats["rows"],
                "splits": stats["splits"],
            }
    truth = root / "truth.json"
    if truth.is_file():  # gen-logs: the generator's oracle AUC per domain (the headroom)
        t = json.loads(truth.read_text())
        source |= {
            "seed": t.get("seed"),
            "oracle_auc": t.get("oracle_auc"),
            "domains": {
                d: {
                    k: v.get(k)
                    for k in ("share", "shift_strength", "oracle_auc", "oracle_auc_shared_only")
                }
                for d, v in t.get("domains", {}).items()
            },
        }
    return {
        "schema": str(root / "schema.yaml"),
        "train": str(root / "train"),
        "val": str(root / "val"),
        "test": str(root / "test"),
        "source": source,
    }


def with_domain_feature(schema_path: str, out: Path) -> str:
    """The "Mix + domain indicator" baseline's schema: ``schema_path`` plus a sparse feature that
    embeds the domain column (its own table), written to ``out``; returns its path."""
    from mdlora.embeddings.schema import Schema

    d = Schema.load(schema_path).to_dict()
    dim = d["tables"][0]["dim"]
    d["tables"].append({"name": "domain_indicator", "num_embeddings": 64, "dim": dim})
    d["sparse"].append({"name": "domain_indicator", "table": "domain_indicator",
                        "column": d["domain"]["column"], "policy": "hash"})
    out.write_text(Schema.from_dict(d).dump())
    return str(out)


# ---- one cell: pretrain -> adapt -> score -------------------------------------------------------


def _set(section: dict, **values) -> dict:
    """``section`` plus the values that are not None (None: the config's own default)."""
    return section | {k: v for k, v in values.items() if v is not None}


def configs(args: argparse.Namespace, data: dict, seed: int, root: Path):
    """The pretrain :class:`RunConfig` and the :class:`AdaptConfig` of one cell (flags + ``--*-set``)."""
    from mdlora.config import apply_overrides, from_dict, to_dict
    from mdlora.trainer.config import AdaptConfig, RunConfig

    paths = {k: data[k] for k in ("schema", "train", "val", "test")}
    output = {"root": str(root), "model": MODEL}
    run = {
        "data": _set(paths, batch_size=args.batch),
        "model": _set({}, hidden=args.hidden),
        "optim": _set({}, dense_lr=args.dense_lr, sparse_lr=args.sparse_lr),
        "loop": _set({"seed": seed, "log_every": 200}, epochs=args.epochs, patience=args.patience),
        "dist": {"world_size": args.world_size},
        "output": output,
    }
    adapt = {
        "data": paths,
        "lora": _set({}, method=args.method, alpha=args.alpha),
        "train": _set(
            {},
            lr=args.adapter_lr,
            batch_size=args.adapter_batch,
            eval_every=args.adapter_eval_every,
            confidence=args.confidence,
            weight_decay=args.adapter_weight_decay,
        ),
        # the whole section: a partial one would take LoopConfig's defaults, not AdaptConfig's (10, 2)
        "loop": _set(
            to_dict(AdaptConfig().loop) | {"seed": seed},
            epochs=args.adapter_epochs,
            patience=args.adapter_patience,
        ),
        "dist": {"world_size": args.world_size},
        "output": output,
    }
    return (
        from_dict(RunConfig, apply_overrides(run, args.pretrain_set)),
        from_dict(AdaptConfig, apply_overrides(adapt, args.adapt_set)),
    )


def _predictions(path: Path, label: str) -> dict[str, np.ndarray]:
    """A ``score_dataset`` output as arrays: domain, label, prob, adapter_version (input order)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return {
        "domain": t.column("domain").to_numpy(zero_copy_only=False),
        "label": t.column(label).to_numpy().astype(np.int8),
        "prob": t.column("prob").to_numpy().copy(),
        "adapter": t.column("adapter_version").to_numpy(zero_copy_only=False),
    }


def run_cell(args: argparse.Namespace, data: dict, data_seed: int, seed: int, work: Path) -> dict:
    """Pretrain, adapt and score on a fresh registry; the cell's figures and stage times."""
    from mdlora.config import to_dict
    from mdlora.infra.adapt import adapt
    from mdlora.infra.artifacts import Registry
    from mdlora.infra.pretrain import load_schema, pretrain
    from mdlora.infra.score import Scorer
    from mdlora.infra.storage import open_fs

    cell = f"data {data_seed} seed {seed}"
    root = work / f"registry-d{data_seed}-s{seed}"
    run_cfg, adapt_cfg = configs(args, data, seed, root)
    t0 = time.time()
    _log(f"{cell}: pretrain ({run_cfg.dist.world_size} worker(s), {run_cfg.loop.epochs} epoch(s))")
    backbone = pretrain(run_cfg, run_name=f"pq-d{data_seed}-s{seed}")
    t1 = time.time()
    _log(
        f"{cell}: backbone {backbone['version']} validation WAUC {backbone['metrics'].get('wauc')}; adapt"
    )
    adapted = adapt(adapt_cfg)
    t2 = time.time()
    registry = Registry(*open_fs(str(root)))
    gates = {
        d: gate_of(registry.manifest("adapters", d, "production"), adapt_cfg.train.confidence)
        for d in adapted["bundles"]
    }
    preds, label = {}, load_schema(data["schema"]).label
    for kind, bundles in (
        ("backbone", {}),
        ("adapters", None),
    ):  # {}: no bundle, every row on the backbone
        out = work / f"pred-{kind}-d{data_seed}-s{seed}.parquet"
        Scorer(str(root), MODEL, bundles=bundles).score_dataset(data["test"], str(out))
        preds[kind] = _predictions(out, label)
    t3 = time.time()
    res = compare(preds["backbone"], preds["adapters"], gates, args.resamples, seed)
    if args.finetune:
        res["finetune"] = finetune(args, run_cfg, backbone, adapted, data, preds, root, work, cell)
    _log(
        f"{cell}: test AUC backbone {res['total']['auc_backbone']:.4f} adapters {res['total']['auc_adapters']:.4f}; "
        + ", ".join(
            f"{d} {v['gain']:+.4f} (p {v['p']:.3f}, {v['class']})"
            for d, v in res["domains"].items()
            if v["gain"] is not None
        )
    )
    return res | {
        "data_seed": data_seed,
        "seed": seed,
        "backbone": {k: backbone[k] for k in ("version", "content_hash", "metrics", "step")},
        "adapt": {k: adapted[k] for k in ("method", "rows", "skipped_no_rows", "seconds")},
        "configs": {"pretrain": to_dict(run_cfg), "adapt": to_dict(adapt_cfg)},
        "seconds": {
            "pretrain": round(t1 - t0, 1),
            "adapt": round(t2 - t1, 1),
            "score": round(t3 - t2, 1),
            "bootstrap": round(time.time() - t3, 1),
            "total": round(time.time() - t0, 1),
        },
    }


def finetune(args, run_cfg, backbone: dict, adapted: dict, data: dict, preds: dict, root: Path, work: Path,
             cell: str) -> dict:
    """The per-domain full fine-tune baseline ("what a per-domain model reaches"), as users run it:
    ``pretrain`` from the backbone (``model.init_from``) on one domain's rows (``data.domains``),
    every parameter trained (tables and tower; batch at most 512, as a small domain has few rows),
    then ``score`` of that domain's test rows on the
    new backbone version. Per domain: its test AUC against the backbone's (paired bootstrap), the
    share of that gain the adapters recover, and both trainable parameter counts."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.compute as pc

    from benchmarks.pipeline_quality_stats import compare
    from mdlora.infra.logs import parquet_dataset
    from mdlora.infra.pretrain import load_schema, pretrain
    from mdlora.infra.score import Scorer

    schema = load_schema(data["schema"])
    test = parquet_dataset(data["test"]).to_table(columns=[c for c in schema.columns()])
    probs, seconds, versions = preds["backbone"]["prob"].copy(), {}, {}
    if not np.array_equal(test.column(schema.label).to_numpy().astype(preds["backbone"]["label"].dtype),
                          preds["backbone"]["label"]):
        raise RuntimeError("the test table and the scorings hold the rows in different orders")
    total_params = None
    for d in adapted["bundles"]:
        cfg = replace(run_cfg, data=replace(run_cfg.data, domains=[d], batch_size=min(run_cfg.data.batch_size, 512)),
                      model=replace(run_cfg.model, init_from=backbone["version"]))
        t = time.time()
        try:
            tuned = pretrain(cfg, run_name=f"pq-ft-{d}")
        except ValueError as e:  # a domain with fewer rows than one batch: no fine-tune of its own
            _log(f"{cell}: no fine-tune of {d}: {e}")
            continue
        rows = (preds["backbone"]["domain"] == d)
        scorer = Scorer(str(root), MODEL, backbone_ref=tuned["version"], bundles={})
        domain = pc.cast(test.column(schema.domain.column), pa.string())
        probs[rows] = scorer.score_table(test.filter(pc.equal(domain, d)))
        total_params = sum(p.numel() for p in scorer.served[tuned["version"]].backbone.parameters())
        seconds[d], versions[d] = round(time.time() - t, 1), tuned["version"]
        _log(f"{cell}: fine-tuned {d}: backbone {tuned['version']} ({seconds[d]} s)")
    ft = compare(preds["backbone"], {**preds["backbone"], "prob": probs}, {}, args.resamples, 0)
    out = {}
    for d, v in ft["domains"].items():
        if d not in versions:
            continue
        a = adapted["bundles"].get(d, {})
        out[d] = {"auc_finetune": v["auc_adapter"], "gain_finetune": v["gain"], "p_finetune": v["p"],
                  "class_finetune": v["class"], "params_finetune": total_params,
                  "params_adapter": a.get("param_count"), "version": versions.get(d), "seconds": seconds.get(d)}
    return out


# ---- every cell, outputs, CLI -------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> dict:
    """Every data seed x training seed; the outputs are rewritten after each cell, so an
    interrupted run leaves what finished."""
    from benchmarks.pipeline_quality_report import markdown, summarise
    from mdlora.infra.log import setup_logging

    setup_logging()
    t0 = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="mdlora-pipeline-quality-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"pipeline_quality_{args.name}.json"
    seeds = list(range(args.seed_base, args.seed_base + args.seeds))
    cells, sources, res = [], {}, {}
    try:
        for ds in args.data_seeds:
            data = prepare(args, ds, work)
            if args.domain_feature:
                data["schema"] = with_domain_feature(data["schema"], work / f"schema-domain-{ds}.yaml")
            sources[str(ds)] = data["source"]
            for seed in seeds:
                cells.append(run_cell(args, data, ds, seed, work))
                res = {
                    "command": args.command,
                    "dataset": args.dataset,
                    "data_seeds": args.data_seeds,
                    "seeds": seeds,
                    "sources": sources,
                    "summary": summarise(cells),
                    "cells": cells,
                    "machine": machine(),
                    "seconds": round(time.time() - t0, 1),
                }
                write_results(out, res, markdown(res))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    _log(f"written {out} and {out.with_suffix('.md')} ({res.get('seconds')} s)")
    return res


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the exact command is recorded in the outputs). Flags left unset
    keep the shipped config defaults (``RunConfig`` / ``AdaptConfig``)."""
    # the harness's synthetic world; imported here as quality_data imports torch and torchrec
    from benchmarks.quality_data import SYNTH

    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(NAMES))
    p.add_argument(
        "--path",
        default="",
        help="MovieLens: the source directory (read in place); synthetic: "
        "an existing gen-logs directory to use as is (empty: generate one per data seed)",
    )
    g = p.add_argument_group("synthetic data (gen-logs)")
    g.add_argument("--rows", type=int, default=SYNTH["rows"])
    g.add_argument("--domains", type=int, default=SYNTH["domains"])
    g.add_argument("--users", type=int, default=SYNTH["users"])
    g.add_argument("--items", type=int, default=SYNTH["items"])
    g.add_argument("--days", type=int, default=SYNTH["days"])
    g.add_argument(
        "--shifts",
        default="a",
        help="shift families of the generated logs (gen-logs --shifts: a comma list of a-e)",
    )
    p.add_argument(
        "--data-seeds", type=ints, default=[0], help="gen-logs seeds / MovieLens split seeds"
    )
    p.add_argument("--seeds", type=int, default=1, help="training seeds per data seed (loop.seed)")
    p.add_argument(
        "--finetune",
        action="store_true",
        help="also the per-domain full fine-tune baseline: pretrain from the backbone on each domain",
    )
    p.add_argument(
        "--domain-feature",
        action="store_true",
        help='the "Mix + domain indicator" backbone: the domain column is also an embedded feature',
    )
    p.add_argument("--seed-base", type=int, default=0)
    g = p.add_argument_group("pretrain (RunConfig)")
    g.add_argument(
        "--epochs",
        type=int,
        default=20,
        help="loop.epochs, an upper bound: the backbone stops "
        "early and its best validation epoch is published (an undertrained backbone flatters adapters)",
    )
    g.add_argument(
        "--patience", type=int, default=2, help="loop.patience (epochs without a better val WAUC)"
    )
    g.add_argument("--batch", type=int, default=None, help="data.batch_size (global)")
    g.add_argument("--dense-lr", type=float, default=None)
    g.add_argument("--sparse-lr", type=float, default=None)
    g.add_argument("--hidden", type=ints, default=None)
    g.add_argument(
        "--world-size", type=int, default=1, help="Ray Train workers of pretrain and adapt"
    )
    g.add_argument(
        "--pretrain-set",
        action="append",
        default=[],
        metavar="K=V",
        help="any RunConfig override (repeatable), e.g. optim.schedule=cosine",
    )
    g = p.add_argument_group("adapt (AdaptConfig)")
    g.add_argument("--method", default=None, choices=["mlora", "multilora"])
    g.add_argument("--alpha", type=float, default=None, help="lora.alpha (rank = out // alpha)")
    g.add_argument("--adapter-lr", type=float, default=None)
    g.add_argument("--adapter-epochs", type=int, default=None)
    g.add_argument("--adapter-patience", type=int, default=None)
    g.add_argument("--adapter-batch", type=int, default=None)
    g.add_argument("--adapter-eval-every", type=int, default=None)
    g.add_argument("--adapter-weight-decay", type=float, default=None)
    g.add_argument(
        "--confidence", type=float, default=None, help="train.confidence: the gate (0: off)"
    )
    g.add_argument(
        "--adapt-set",
        action="append",
        default=[],
        metavar="K=V",
        help="any AdaptConfig override (repeatable), e.g. lora.aux=gender",
    )
    p.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument(
        "--work",
        default="",
        help="scratch dir for logs, registries, predictions (kept when given; "
        "default: a temporary dir, removed)",
    )
    p.add_argument("--out", default=f"benchmarks/results/{time.strftime('%Y-%m-%d')}")
    p.add_argument("--name", default="", help="output name (default from --dataset)")
    args = p.parse_args(argv)
    if args.dataset == "synthetic" and args.path and len(args.data_seeds) > 1:
        p.error(
            "--path: an existing gen-logs directory is one data seed; leave --path out to generate several"
        )
    if args.dataset != "synthetic" and not args.path:
        p.error(f"--path: {args.dataset} needs the MovieLens source directory")
    args.name = args.name or NAMES[args.dataset]
    args.command = "python -m benchmarks.pipeline_quality " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    return args


def main(argv: list[str] | None = None) -> dict:
    """CLI: run every cell, write JSON + Markdown, print the Markdown."""
    from benchmarks.pipeline_quality_report import markdown

    res = run_all(parse(argv))
    if res:
        print(markdown(res), flush=True)
    return res


if __name__ == "__main__":
    main()
