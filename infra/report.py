"""Per-domain AUC table (backbone alone vs with adapters) as Markdown, JSON and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path


def auc_table(backbone: list[dict], adapters: list[dict]) -> list[dict]:
    """Rows ``{domain, rows, adapter, auc_backbone, auc_adapter, delta}`` from scoring summaries.

    Args:
        backbone: ``Scorer.score_dataset`` summaries of the same datasets scored without bundles.
        adapters: the summaries scored with each row routed to its domain's bundle.

    Returns:
        One row per domain, in name order.
    """
    base = {d: v for s in backbone for d, v in s["domains"].items()}
    tuned = {d: v for s in adapters for d, v in s["domains"].items()}
    rows = []
    for d in sorted(tuned):
        a, b = tuned[d].get("auc"), base[d].get("auc")
        rows.append({"domain": d, "rows": tuned[d]["rows"], "adapter": tuned[d].get("adapter_version") or "-",
                     "auc_backbone": b, "auc_adapter": a,
                     "delta": None if a is None or b is None else a - b})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table as Markdown."""
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| domain | test rows | adapter | AUC backbone | AUC with adapter | Δ |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
        lines.append(f"| {r['domain']} | {r['rows']:,} | {r['adapter']} | {f(r['auc_backbone'])} | "
                     f"{f(r['auc_adapter'])} | {delta} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Bar chart of per-domain AUC, backbone vs adapter (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["domain"] for r in rows]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.5))
    ax.bar([i - 0.2 for i in x], [r["auc_backbone"] or 0 for r in rows], 0.4, label="backbone")
    ax.bar([i + 0.2 for i in x], [r["auc_adapter"] or 0 for r in rows], 0.4, label="with adapter")
    vals = [v for r in rows for v in (r["auc_backbone"], r["auc_adapter"]) if v is not None]
    ax.set_ylim(max(0.0, min(vals) - 0.03), min(1.0, max(vals) + 0.04))
    ax.set_xticks(list(x), names)
    ax.set_ylabel("test AUC")
    ax.legend(loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict) -> dict:
    """Write ``report.md`` + ``auc.png`` into ``out``; return their paths and the table text."""
    table = markdown(summary["auc"])
    png = plot(summary["auc"], out / "auc.png")
    bb = summary["backbone"]
    md = "\n".join([
        "# mdlora demo report", "",
        f"Backbone `{bb['name']}` {bb['version']} (content hash `{bb['content_hash'][:16]}`), "
        f"pipeline time {summary['seconds']} s.", "",
        "## Per-domain test AUC", "", table, "",
        *( [f"![per-domain AUC]({png.name})", ""] if png else []),
        "## Summary", "", "```json", json.dumps(summary, indent=2, default=str)[:20000], "```",
    ])
    (out / "report.md").write_text(md)
    return {"md": out / "report.md", "png": png, "markdown_table": table}
