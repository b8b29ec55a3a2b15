"""Per-domain quality of every multi-domain method on the same data, backbone and harness.

Methods (:mod:`benchmarks.quality_methods`): ``single`` (a backbone per domain, its rows only),
``mix`` (one backbone on all domains = the pretrained backbone), ``finetune`` (Mix fully
fine-tuned per domain), ``shared_bottom``, ``mmoe``, ``star`` (:mod:`mdlora.trainer.baselines`),
``mlora`` (SingleLoRA), ``multilora`` and its no-fusion ablations ``multilora_add`` /
``multilora_avg``. All share the embedding layer (dim from the schema: 16) and the tower
config (MLP [256, 128]); LoRA ranks [8, 8]; Adam. Everything runs in-process on CPU without
Ray, with the distributed jobs' model, loop and adapter code (``--jobs N`` runs the seeds after
the first in N - 1 spawned processes, for machines with idle cores).

Hyper-parameters are chosen on VALIDATION only. Full models: Mix's (lr, batch) on the first seed
by a coordinate search over ``--lrs`` then ``--batches`` (MultiLoRA paper grid; trials capped at
``--select-epochs``), reused by every full model. Adapters: lr over ``--adapter-lrs`` on each
seed's validation split, per family (MLoRA; MultiLoRA, reused by its add/avg ablations), at
Mix's batch. Every model stops early on validation WAUC (``--patience`` epochs, at most
``--epochs`` / ``--adapter-epochs``) and keeps its best state; the test split is scored once per
seed with :class:`mdlora.trainer.metrics.DomainMetrics`. Progress goes to stdout.

Outputs in ``--out``: ``quality_<name>.json`` (every figure, per seed and mean ± std, the
command), ``.md`` (tables) and ``.png`` (per-domain AUC bars).

Usage::

    python -m benchmarks.quality --dataset movielens-1m --path ../shared/data/movielens-1m --seeds 3
    python -m benchmarks.quality --dataset synthetic --path /tmp/synth --seeds 3
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, write_results
from benchmarks.quality_data import load
from benchmarks.quality_methods import FULL, METHODS, Hyper, Outcome, SeedRun, metrics
from benchmarks.quality_report import markdown, plot, summarise
from mdlora.atomic import write_bytes
from mdlora.trainer.config import AdaptTrainConfig, ModelConfig

RULE = ("full models: Mix's (lr, batch) by validation WAUC on the first seed (lr at the first batch, "
        "then the batch at that lr; trials of at most {select_epochs} epoch(s)), reused by every "
        "full model; adapters: lr by validation WAUC per family (mlora; multilora, reused by its "
        "add/avg ablations) on each seed's own validation split, at Mix's batch")
NAMES = {"movielens-1m": "ml1m", "movielens-100k": "ml100k", "synthetic": "synthetic"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def select(data, args, model: ModelConfig) -> tuple[dict[str, Hyper], SeedRun, list[dict]]:
    """Choose Mix's (lr, batch) on validation (first seed); returns the full-model hyper-parameters,
    the first seed's run and the trials.

    Coordinate search: lr over ``--lrs`` at the first of ``--batches``, then the other batches at
    the best lr; each trial trains at most ``--select-epochs`` epochs (0: the full budget, and the
    winning trial is the first seed's Mix).
    """
    seed, pat, budget = args.seed_base, args.patience, args.select_epochs or args.epochs
    trials, runs = [], {}

    def trial(lr: float, b: int) -> float:
        if (lr, b) not in runs:
            hp = {m: Hyper(lr, b, budget, pat) for m in FULL}
            runs[lr, b] = SeedRun(data, seed, hp, model, args.ranks, _log)
            out = runs[lr, b].run("mix")
            trials.append({"method": "mix", "lr": lr, "batch": b, "val_wauc": out.val_wauc,
                           "epoch": out.epochs[0], "seconds": out.seconds})
            _log(f"select mix lr={lr:g} batch={b}: val WAUC {_f(out.val_wauc)} (epoch {out.epochs[0]})")
        return runs[lr, b].run("mix").val_wauc

    lr = max(args.lrs, key=lambda v: trial(v, args.batches[0]))
    batch = max(args.batches, key=lambda b: trial(lr, b))
    hp = {m: Hyper(lr, batch, args.epochs, pat) for m in FULL}
    first = runs[lr, batch] if not args.select_epochs else SeedRun(data, seed, hp, model, args.ranks, _log)
    first.hp = dict(hp)
    return hp, first, trials


def select_adapters(run: SeedRun, args) -> list[dict]:
    """Adapter lr over ``--adapter-lrs`` on this seed's validation, per family (mlora; multilora,
    reused by its add/avg ablations), at Mix's batch; the winners are cached as this seed's results."""
    trials, batch = [], run.hp["mix"].batch

    def hyper(lr: float) -> Hyper:
        return Hyper(lr, batch, args.adapter_epochs, args.adapter_patience, args.adapter_eval_every,
                     args.adapter_confidence)

    for family in ("mlora", "multilora"):
        members = [m for m in args.methods if m == family or m.startswith(family + "_")]
        if not members:
            continue
        scores = {}
        for lr in args.adapter_lrs:
            run.hp[family] = hyper(lr)
            out = scores[lr] = run.run(family)
            trials.append({"method": family, "lr": lr, "batch": batch, "val_wauc": out.val_wauc,
                           "epoch": max(out.epochs), "seconds": out.seconds, "seed": run.seed})
            _log(f"seed {run.seed} select {family} lr={lr:g}: val WAUC {_f(out.val_wauc)} "
                 f"(best epochs {out.epochs})")
        best = max(scores, key=lambda k: scores[k].val_wauc)
        run.hp |= {m: hyper(best) for m in members}
        run.cached[family] = scores[best]
    return trials


def seed_results(data, run: SeedRun, args) -> tuple[dict, dict, dict[str, Outcome]]:
    """Select the adapter lrs, then train and score every method on one seed.

    Returns:
        ``(per-method test metrics (+ lr, batch, trials), params, outcomes)``.
    """
    trials = select_adapters(run, args)
    scores, params, outs = {"adapter_selection": trials}, {}, {}
    for m in args.methods:
        out = outs[m] = run.run(m)
        params[m] = {"trainable": out.trainable, "total": out.total}
        res = metrics(out.probs, data.splits["test"], data.domains)
        scores[m] = res | {"seed": run.seed, "val_wauc": out.val_wauc, "best_epochs": out.epochs,
                           "seconds": out.seconds, "lr": run.hp[m].lr, "batch": run.hp[m].batch}
        _log(f"seed {run.seed} {m}: test AUC {_f(res['auc'])} WAUC {_f(res['wauc'])} "
             + " ".join(f"{d} {_f(v['auc'])}" for d, v in res["domains"].items())
             + f" ({out.seconds:.0f}s)")
    return scores, params, outs


def _seed_worker(args: argparse.Namespace, hp: dict[str, Hyper], seed: int) -> tuple[dict, dict]:
    """One seed in a worker process (``--jobs``): reload the data, run every method."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    data = load(args.dataset, args.path, **({"rows": args.rows} if args.rows else {}))
    run = SeedRun(data, seed, hp, ModelConfig(hidden=list(args.hidden)), args.ranks, _log)
    return seed_results(data, run, args)[:2]


def run_all(args) -> dict:
    """Load data, select hyper-parameters, train and score every method on every seed.

    Seeds after the first run in ``--jobs - 1`` worker processes (spawned after the selection)
    while this process runs the first seed. The outputs are rewritten after the first seed and
    at the end, so an interrupted run leaves what finished.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load(args.dataset, args.path, **({"rows": args.rows} if args.rows else {}))
    _log(f"data {data.source.get('dataset')}: rows {data.sizes()}")
    model = ModelConfig(hidden=list(args.hidden))
    hp, first, trials = select(data, args, model)
    _log(f"chosen for full models: lr {hp['mix'].lr:g}, batch {hp['mix'].batch}")
    seeds = [args.seed_base + i for i in range(args.seeds)]
    results: dict[int, tuple[dict, dict]] = {}

    def report() -> dict:
        done = [s for s in seeds if s in results]
        res = {
            "command": args.command, "dataset": data.source, "rows": data.sizes(),
            "methods": args.methods, "seeds": done, "seeds_requested": seeds,
            "model": {"embedding_dim": data.schema.tables[0].dim, "hidden": list(args.hidden),
                      "lora_ranks": list(args.ranks), "optimizer": "Adam", "patience": args.patience,
                      "max_epochs": args.epochs, "adapter_max_epochs": args.adapter_epochs},
            "hyper": {m: asdict(hp[m]) if m in hp else
                      {"lr": [results[s][0][m]["lr"] for s in done], "batch": hp["mix"].batch,
                       "epochs": args.adapter_epochs, "patience": args.adapter_patience,
                       "eval_every": args.adapter_eval_every, "confidence": args.adapter_confidence}
                      for m in args.methods},
            "selection": {"rule": RULE.format(select_epochs=args.select_epochs or "full"),
                          "trials": trials + [t for s in done for t in results[s][0]["adapter_selection"]]},
            "params": results[done[0]][1],
            "per_seed": {m: [results[s][0][m] for s in done] for m in args.methods},
            "machine": machine(), "threads": args.threads, "jobs": args.jobs,
            "seconds": time.perf_counter() - t0,
        }
        res["summary"] = summarise(res["per_seed"], data.domains)
        write(res, Path(args.out) / f"quality_{args.name}.json")
        return res

    pool = (ProcessPoolExecutor(args.jobs - 1, mp_context=multiprocessing.get_context("spawn"))
            if args.jobs > 1 else None)
    try:
        futures = {s: pool.submit(_seed_worker, args, hp, s) for s in seeds[1:]} if pool else {}
        scores, params, outs = seed_results(data, first, args)
        results[seeds[0]] = scores, params
        if args.predictions:
            _save_predictions(Path(args.out) / f"quality_{args.name}_predictions.npz", data, outs)
        report()
        for s in seeds[1:]:
            if s in futures:
                results[s] = futures[s].result()
            else:
                run = SeedRun(data, s, hp, model, args.ranks, _log)
                results[s] = seed_results(data, run, args)[:2]
            report()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return report()


def write(res: dict, out: Path) -> None:
    """JSON, Markdown (same stem) and the PNG bar chart."""
    write_results(out, res, markdown(res))
    plot(res, out.with_suffix(".png"))


def _save_predictions(path: Path, data, outcomes: dict[str, Outcome]) -> None:
    """First-seed test probabilities per method, with labels and domain ids (for checks)."""
    buf = io.BytesIO()
    test = data.splits["test"]
    np.savez(buf, labels=test.labels().numpy(), domains=test.domains.numpy(),
             **{m: o.probs.numpy() for m, o in outcomes.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (the exact command is recorded in the outputs)."""
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(NAMES))
    p.add_argument("--path", default="", help="MovieLens source dir; synthetic: gen-logs dir "
                   "(generated there when it has no schema.yaml; empty: a temporary dir)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-base", type=int, default=0)
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--patience", type=int, default=2, help="epochs without a better validation WAUC")
    p.add_argument("--epochs", type=int, default=10, help="max epochs of a full model")
    p.add_argument("--adapter-epochs", type=int, default=20, help="max epochs of an adapter")
    p.add_argument("--lrs", type=floats, default=[1e-3, 5e-4, 1e-4])
    p.add_argument("--batches", type=ints, default=[2048, 512, 4096],
                   help="the lrs are compared at the first")
    p.add_argument("--adapter-lrs", type=floats, default=[1e-3, 5e-4, 1e-4])
    p.add_argument("--adapter-confidence", type=float, default=AdaptTrainConfig.confidence,
                   help="MLoRA gate: keep a domain's adapter only when it beats the backbone in this share "
                        "of bootstrap resamples of the validation half early stopping did not see (0: off)")
    p.add_argument("--adapter-eval-every", type=int, default=10, help="adapters also validate every "
                   "N steps: on a converged backbone their validation peak comes early in epoch 1")
    p.add_argument("--adapter-patience", type=int, default=4, help="adapter validation checks "
                   "without a better validation WAUC")
    p.add_argument("--select-epochs", type=int, default=0,
                   help="epoch budget of each Mix selection trial (0: full --epochs)")
    p.add_argument("--hidden", type=ints, default=[256, 128])
    p.add_argument("--ranks", type=ints, default=[8, 8])
    p.add_argument("--rows", type=int, default=0, help="synthetic rows when generating (0: default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=1, help="processes: seeds after the first run in "
                   "jobs - 1 spawned workers, in parallel with the first")
    p.add_argument("--out", default="benchmarks/results/2026-11-23")
    p.add_argument("--name", default="", help="output name (default from --dataset)")
    p.add_argument("--predictions", action="store_true", help="also write first-seed test predictions")
    p.add_argument("--quick", action="store_true", help="lrs 1e-3, batches 2048, 3 epochs, patience 1")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad} (known: {', '.join(METHODS)})")
    if args.quick:
        args.lrs, args.batches, args.adapter_lrs = [1e-3], [2048], [1e-3]
        args.epochs, args.adapter_epochs, args.patience, args.adapter_patience = 3, 3, 1, 2
    args.name = args.name or NAMES[args.dataset]
    args.command = "python -m benchmarks.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    """CLI: run, write JSON + Markdown + PNG, print the table."""
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    res = run_all(args)
    print(markdown(res), flush=True)
    return res


if __name__ == "__main__":
    main()
