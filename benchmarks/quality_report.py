"""Summaries, Markdown tables and the per-domain AUC bar chart of the quality harness."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAPER = {"mix": 0.8105, "star": 0.8055, "mmoe": 0.8097, "mlora": 0.8160, "multilora": 0.8170}
"""MultiLoRA paper, Table 3, ML-1M (HAMUR protocol), total AUC."""
GOALS = {"mlora": 0.8170, "multilora": 0.8190}
"""Issue 5: our total AUC goals on ML-1M."""


def _stat(values: list) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarise(per_seed: dict[str, list[dict]], domains: list[str]) -> dict:
    """Mean ± std over seeds of every figure, and the comparison with Mix.

    Args:
        per_seed: method -> one :meth:`DomainMetrics.compute` result (+ extras) per seed.
        domains: domain names.

    Returns:
        method -> ``{"auc", "wauc", "logloss": stat, "domains": {d: {"auc", "logloss": stat}},
        "beats_mix": {...}}``; stat = ``{"mean", "std", "n"}``. ``beats_mix``: per domain, the
        number of seeds whose AUC is above (and below: negative transfer) Mix's on the same seed,
        and whether the mean is above.
    """
    out = {}
    mix = per_seed.get("mix")
    for m, runs in sorted(per_seed.items(), key=lambda kv: kv[0] != "mix"):  # mix first
        s = {k: _stat([r[k] for r in runs]) for k in ("auc", "wauc", "logloss")}
        s["domains"] = {d: {k: _stat([r["domains"][d][k] for r in runs]) for k in ("auc", "logloss")}
                        for d in domains}
        if mix and m != "mix":
            wins = {d: int(sum(_above(r["domains"][d]["auc"], x["domains"][d]["auc"])
                               for r, x in zip(runs, mix, strict=False))) for d in domains}
            mean_above = {d: _above(s["domains"][d]["auc"]["mean"], out["mix"]["domains"][d]["auc"]["mean"])
                          for d in domains}
            below = {d: int(sum(_above(x["domains"][d]["auc"], r["domains"][d]["auc"])
                                for r, x in zip(runs, mix, strict=False))) for d in domains}
            s["beats_mix"] = {"seeds_above_per_domain": wins, "mean_above_per_domain": mean_above,
                              "seeds_below_per_domain": below,
                              "every_domain_every_seed": all(w == len(runs) for w in wins.values()),
                              "every_domain_mean": all(mean_above.values())}
        out[m] = s
    return out


def _above(a: float | None, b: float | None) -> bool:
    """``a > b``; False when either AUC is undefined (a single class in the rows)."""
    return a is not None and b is not None and a > b


def _pm(stat: dict, digits: int = 4) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(res: dict) -> str:
    """Tables: per-domain AUC, total AUC, WAUC, params; per-domain LogLoss; hyper-parameters."""
    s, domains = res["summary"], list(res["rows"]["test"])
    ml1m = res["dataset"].get("dataset") == "movielens-1m"
    lines = [f"# Quality: {res['dataset'].get('dataset')} ({len(res['seeds'])} seeds: {res['seeds']})", "",
             f"Command: `{res['command']}`", "",
             f"Test rows per domain: {res['rows']['test']}; train rows: {res['rows']['train']}.",
             "Mean ± std over seeds (sample std). Trainable = parameters the method trains, all "
             "domains; total = parameters served (frozen backbone included).", ""]
    head = ["method", *[f"AUC {d}" for d in domains], "total AUC", "WAUC", "> Mix every domain",
            "seed×domain cells < Mix", "trainable", "total"]
    if ml1m:
        head.insert(len(domains) + 2, "paper")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in res["methods"]:
        st = s[m]
        beats = st.get("beats_mix")
        wins = ("-" if beats is None else
                ("yes" if beats["every_domain_mean"] else "no")
                + f" (seeds: {', '.join(str(v) for v in beats['seeds_above_per_domain'].values())})")
        below = "-" if beats is None else f"{sum(beats['seeds_below_per_domain'].values())} of " \
            f"{len(domains) * len(res['seeds'])}"
        row = [m, *[_pm(st["domains"][d]["auc"]) for d in domains], _pm(st["auc"]), _pm(st["wauc"]),
               wins, below, f"{res['params'][m]['trainable']:,}", f"{res['params'][m]['total']:,}"]
        if ml1m:
            row.insert(len(domains) + 2, f"{PAPER[m]:.4f}" if m in PAPER else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "LogLoss (test):", "",
              "| method | " + " | ".join(f"LogLoss {d}" for d in domains) + " | total LogLoss |",
              "|---|" + "---|" * (len(domains) + 1)]
    for m in res["methods"]:
        st = s[m]
        lines.append(f"| {m} | " + " | ".join(_pm(st["domains"][d]["logloss"]) for d in domains)
                     + f" | {_pm(st['logloss'])} |")
    if ml1m:
        lines += ["", "Goals (issue 5, total AUC): "
                  + "; ".join(f"{m} >= {g:.4f}: {_goal(s, m, g)}" for m, g in GOALS.items() if m in s)]
    lines += ["", "Hyper-parameters (chosen on validation only): " + res["selection"]["rule"] + ".", "",
              "| method | lr | batch | max epochs | patience | validate every N steps | MLoRA gate confidence |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {_lr(h['lr'])} | {h['batch']} | {h['epochs']} | {h['patience']} | "
              f"{h.get('eval_every') or 'epoch end'} | {h.get('confidence', '-') if m == 'mlora' else '-'} |"
              for m, h in res["hyper"].items()]
    lines += ["", "Selection trials (validation WAUC):", "",
              "| method | seed | lr | batch | val WAUC | best epoch |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['method']} | {t.get('seed', res['seeds'][0])} | {t['lr']:g} | {t['batch']} | "
              f"{t['val_wauc']:.4f} | {t['epoch']} |" for t in res["selection"]["trials"]]
    lines += ["", f"Wall time {res['seconds'] / 60:.1f} min, {res['threads']} thread(s), "
              f"{res['machine']['cores']} cores (shared), load {res['machine']['loadavg']}."]
    return "\n".join(lines) + "\n"


def _lr(v: float | list[float]) -> str:
    """One lr, or the per-seed lrs of a method selected on each seed."""
    return f"{v:g}" if isinstance(v, float) else ", ".join(f"{x:g}" for x in v) + " (per seed)"


def _goal(s: dict, m: str, goal: float) -> str:
    mean = s[m]["auc"]["mean"]
    if mean is None:
        return "-"
    return f"{mean:.4f} ({'met' if mean >= goal else f'gap {goal - mean:.4f}'})"


def plot(res: dict, path: Path) -> None:
    """Grouped bars of per-domain (and total) test AUC, mean ± std over seeds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, methods = res["summary"], res["methods"]
    groups = [*res["rows"]["test"], "total"]
    fig, ax = plt.subplots(figsize=(min(14, max(8, 0.35 * len(groups) * len(methods))), 4.5))
    width = 0.8 / len(methods)
    lo, hi = 1.0, 0.0
    for i, m in enumerate(methods):
        stats = [s[m]["domains"][g]["auc"] for g in groups[:-1]] + [s[m]["auc"]]
        mean = [x["mean"] or 0.0 for x in stats]
        std = [x["std"] or 0.0 for x in stats]
        lo, hi = min(lo, *[a for a in mean if a]), max(hi, *mean)
        ax.bar(np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width, mean, width,
               yerr=std, capsize=2, label=m)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylim(max(0.0, lo - 0.02), min(1.0, hi + 0.01))
    ax.set_ylabel("test AUC")
    ax.set_title(f"{res['dataset'].get('dataset')}: per-domain AUC, mean ± std over "
                 f"{len(res['seeds'])} seed(s)")
    ax.legend(ncol=min(5, len(methods)), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
