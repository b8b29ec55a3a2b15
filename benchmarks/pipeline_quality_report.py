"""Summary over cells and the Markdown tables of :mod:`benchmarks.pipeline_quality`."""

from __future__ import annotations

from collections import Counter

import numpy as np

from benchmarks.quality_report import _pm, _stat

CLASSES = ("above", "equal", "below", "n/a")


def summarise(cells: list[dict]) -> dict:
    """Mean ± sd over cells (data seed x training seed) of every per-domain and total figure.

    Args:
        cells: :func:`benchmarks.pipeline_quality.run_cell` results.

    Returns:
        ``{"cells", "domains": {d: {figure: stat, "classes": {class: cells}, "p", "gate": [...]}},
        "total": {...}}``; stat = ``{"mean", "std", "n"}`` (sample sd).
    """
    figures = ("rows", "auc_backbone", "auc_adapter", "gain", "logloss_backbone", "logloss_adapter")
    domains = {}
    for d in sorted({d for c in cells for d in c["domains"]}):
        runs = [c["domains"][d] for c in cells if d in c["domains"]]
        domains[d] = {k: _stat([r[k] for r in runs]) for k in figures} | {
            "classes": _classes(runs),
            "p": [r["p"] for r in runs],
            "gate": [
                {k: (r["gate"] or {}).get(k) for k in ("decision", "confidence")} for r in runs
            ],
        }
    keys = [f"{k}_{kind}" for k in ("auc", "wauc", "logloss") for kind in ("backbone", "adapters")]
    total = {k: _stat([c["total"][k] for c in cells]) for k in [*keys, "gain"]}
    return {
        "cells": len(cells),
        "domains": domains,
        "total": total
        | {"classes": _classes([c["total"] for c in cells]), "p": [c["total"]["p"] for c in cells]},
    }


def _classes(runs: list[dict]) -> dict[str, int]:
    n = Counter(r["class"] for r in runs)
    return {k: n[k] for k in CLASSES if n[k] or k != "n/a"}


def _f(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _p(p: float | None, resamples: int) -> str:
    """p with its resolution: 0 and 1 read as beyond the last resample."""
    if p is None:
        return "-"
    return (
        f"< {1 / resamples:g}" if p == 0 else f"> {1 - 1 / resamples:g}" if p == 1 else f"{p:.3f}"
    )


def _gate(g: dict | None) -> str:
    if not g:
        return "-"
    conf = g.get("confidence")
    return g["decision"] + ("" if conf is None else f" ({conf:.2f})")


def _oracle(pair: tuple) -> str:
    return "-" if pair[0] is None else f"{pair[0]:.4f} ({_f(pair[1])})"


def _gates(gates: list[dict]) -> str:
    """The gate's decisions over cells, each with the cells' confidences (where it ran)."""
    out = []
    for decision in ("adapter", "backbone (gate)", "backbone (no gain)"):
        conf = [g["confidence"] for g in gates if g["decision"] == decision]
        if conf:
            shown = [f"{c:.2f}" for c in conf if c is not None]
            out.append(f"{decision} {len(conf)}" + (f" ({', '.join(shown)})" if shown else ""))
    return "; ".join(out) or "-"


def _finetune(cells: list[dict], s: dict) -> list[str]:
    """The per-domain full fine-tune baseline beside the adapters (``--finetune`` cells only)."""
    cells = [c for c in cells if c.get("finetune")]
    if not cells:
        return []
    lines = [
        "## Per-domain full fine-tune (mean over cells)",
        "",
        "`pretrain` from the backbone (`model.init_from`) on the domain's rows only, every table and "
        "layer trained: what a per-domain model reaches. Recovered = adapter gain / fine-tune gain "
        "(mean gains), where the fine-tune gains >= 0.005.",
        "",
        "| domain | fine-tune gain | cells above / equal / below | adapter gain | recovered | trainable "
        "parameters: adapters / fine-tune |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for d in s["domains"]:
        runs = [c["finetune"][d] for c in cells if d in c["finetune"]]
        if not runs:
            continue
        ft = float(np.mean([r["gain_finetune"] for r in runs]))
        ad = float(np.mean([c["domains"][d]["gain"] for c in cells]))
        cls = [r["class_finetune"] for r in runs]
        share = f"{ad / ft:.0%}" if ft >= 0.005 else "-"
        pa, pf = runs[0]["params_adapter"], runs[0]["params_finetune"]
        lines.append(
            f"| {d} | {ft:+.4f} | {cls.count('above')} / {cls.count('equal')} / {cls.count('below')} | "
            f"{ad:+.4f} | {share} | {pa:,} / {pf:,} ({pa / pf:.2%}) |"
        )
    return lines + [""]


def markdown(res: dict) -> str:
    """Summary table (mean ± sd over cells), a table per cell, stage times and the settings."""
    s, cells = res["summary"], res["cells"]
    first = cells[0]["configs"] if cells else {}
    resamples = cells[0]["total"]["resamples"] if cells else 0
    oracle = {  # gen-logs: the generator's oracle AUC per domain (with / without the domain's own
        # shift: their gap is what a domain-specific model could add), mean over data seeds
        d: tuple(
            _stat([src.get("domains", {}).get(d, {}).get(k) for src in res["sources"].values()])[
                "mean"
            ]
            for k in ("oracle_auc", "oracle_auc_shared_only")
        )
        for d in s["domains"]
    }
    pre, ad = first.get("pretrain", {}), first.get("adapt", {})
    lines = [
        f"# Quality through the production pipeline: {res['dataset']} ({s['cells']} cell(s): data seeds "
        f"{res['data_seeds']} x training seeds {res['seeds']})",
        "",
        f"Command: `{res['command']}`",
        "",
        "What users run, through the functions the CLI calls: `pretrain` (Ray Train, "
        f"{pre.get('dist', {}).get('world_size')} worker(s), TorchRec-sharded tables, fused "
        f"{pre.get('optim', {}).get('sparse_optimizer')}) -> `adapt` ({ad.get('lora', {}).get('method')}, "
        f"gate confidence {ad.get('train', {}).get('confidence')}) -> `score` of the test split twice: the "
        "backbone alone (no bundle) and every row routed to its domain's production bundle. Gain = adapter "
        f"AUC - backbone AUC on the same rows. Paired bootstrap ({resamples} resamples of the domain's test "
        "rows, positives and negatives drawn apart, the same rows for both models): one-sided p for "
        "adapters > backbone (a zero gain counts half), class **above** p < 0.05, **below** p > 0.95, "
        "else **equal**. Gate: the decision and confidence recorded in each bundle's manifest "
        "(`metrics.train.gain_confidence`; `backbone (gate)`: the trained state was reset to the zero "
        "update, `backbone (no gain)`: nothing beat the backbone on validation).",
        "",
        "## Summary (mean ± sd over cells)",
        "",
        "| domain | test rows | oracle AUC (shared part only) | backbone AUC | adapter AUC | gain | cells above / equal / below "
        "| p per cell | gate: cells (confidences) |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for d, v in s["domains"].items():
        c = v["classes"]
        lines.append(
            f"| {d} | {_f(v['rows']['mean'], ',.0f')} | {_oracle(oracle[d])} | {_pm(v['auc_backbone'])} | "
            f"{_pm(v['auc_adapter'])} | {_pm(v['gain'])} | {c['above']} / {c['equal']} / {c['below']} | "
            f"{', '.join(_p(p, resamples) for p in v['p'])} | {_gates(v['gate'])} |"
        )
    t = s["total"]
    c = t["classes"]
    lines += [
        f"| **total AUC** | | | {_pm(t['auc_backbone'])} | {_pm(t['auc_adapters'])} | {_pm(t['gain'])} | "
        f"{c['above']} / {c['equal']} / {c['below']} | {', '.join(_p(p, resamples) for p in t['p'])} | |",
        f"| **WAUC** | | | {_pm(t['wauc_backbone'])} | {_pm(t['wauc_adapters'])} | | | | |",
        "",
        f"LogLoss (total): backbone {_pm(t['logloss_backbone'])}, adapters {_pm(t['logloss_adapters'])}.",
        "",
    ]
    lines += _finetune(cells, s)
    for cell in cells:
        lines += [
            f"## Cell: data seed {cell['data_seed']}, training seed {cell['seed']}",
            "",
            "| domain | test rows | backbone AUC | backbone LogLoss | adapter AUC | adapter LogLoss | gain "
            "| bootstrap mean gain | 95 % interval | p | class | gate (confidence) | val AUC backbone -> adapter |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|",
        ]
        for d, v in cell["domains"].items():
            ci = "-" if v["ci"] is None else f"[{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]"
            val = (v["gate"] or {}).get("validation", {})
            lines.append(
                f"| {d} | {v['rows']:,} | {_f(v['auc_backbone'])} | {_f(v['logloss_backbone'])} | "
                f"{_f(v['auc_adapter'])} | {_f(v['logloss_adapter'])} | {_f(v['gain'], '+.4f')} | "
                f"{_f(v['gain_mean'], '+.4f')} | {ci} | {_p(v['p'], resamples)} | {v['class']} | "
                f"{_gate(v['gate'])} | {_f(val.get('auc_backbone'))} -> {_f(val.get('auc_adapter'))} |"
            )
        t = cell["total"]
        lines += [
            "",
            f"Total AUC {_f(t['auc_backbone'])} -> {_f(t['auc_adapters'])} ({_f(t['gain'], '+.4f')}, "
            f"95 % [{_f(t['ci'][0], '+.4f')}, {_f(t['ci'][1], '+.4f')}], p {_p(t['p'], resamples)}, "
            f"{t['class']}); WAUC {_f(t['wauc_backbone'])} -> {_f(t['wauc_adapters'])}; backbone validation "
            f"WAUC {_f(cell['backbone']['metrics'].get('wauc'))} (step {cell['backbone']['step']}).",
            "",
        ]
    lines += [
        "## Stage times (s)",
        "",
        "| data seed | seed | pretrain | adapt (materialise / train) | score "
        "(2 passes) | bootstrap | total |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for cell in cells:
        sec, a = cell["seconds"], cell["adapt"]["seconds"]
        lines.append(
            f"| {cell['data_seed']} | {cell['seed']} | {sec['pretrain']} | {sec['adapt']} "
            f"({a['materialise']} / {a['train']}) | {sec['score']} | {sec['bootstrap']} | {sec['total']} |"
        )
    lines += [
        "",
        "Settings (first cell; the full configs are in the JSON): pretrain "
        f"{_settings(pre, ('data.batch_size', 'model.hidden', 'optim.dense_lr', 'optim.sparse_lr', 'loop.epochs', 'loop.patience'))}; "
        f"adapt {_settings(ad, ('lora.method', 'lora.alpha', 'train.lr', 'train.batch_size', 'train.weight_decay', 'train.eval_every', 'train.confidence', 'loop.epochs', 'loop.patience'))}.",
        "",
        f"Wall time {res['seconds'] / 60:.1f} min on {res['machine']['cores']} cores (shared), "
        f"load at the end {res['machine']['loadavg']}.",
    ]
    return "\n".join(lines) + "\n"


def _settings(cfg: dict, keys: tuple[str, ...]) -> str:
    """``key value`` of dotted keys of a config dict."""
    out = []
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        out.append(f"{key} {node}")
    return ", ".join(out)
