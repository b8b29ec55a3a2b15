"""The suite's verdicts (targets met or missed, with bottlenecks), Markdown and PNG."""

from __future__ import annotations

from pathlib import Path

from benchmarks.adapt import GOALS
from benchmarks.pretrain import rate

READER_GOAL = 2e6
PRETRAIN_VS_TORCHREC, PRETRAIN_VS_PLAIN, BOUND_SHARE = 0.95, 2.0, 0.6


def _t(section: str, name: str, target: str, measured, met, bottleneck: str = "") -> dict:
    return {
        "section": section,
        "name": name,
        "target": target,
        "measured": measured,
        "met": met,
        "bottleneck": "" if met else bottleneck,
    }


def _pretrain_why(wl: dict, w: str) -> str:
    """Bottleneck of mdlora at world ``w``: the step A/B, Ray's CPU share, rank 0's profile."""
    md, ab = wl["mdlora"].get(w) or {}, wl["ab"].get(w) or {}
    parts = []
    if ab.get("ratio"):
        verdict = "at parity, so the gap is outside the step" if ab["ratio"] >= 0.95 else "slower"
        parts.append(
            f"mdlora's step vs raw TorchRec's in one process (A/B): {ab['ratio']:.2f} ({verdict})"
        )
    cpu = md.get("cpu_s")
    if cpu:
        parts.append(
            f"during the run Ray's other processes + driver used {cpu['ray_and_driver']:.0f} "
            f"CPU-s beside the workers' {cpu['ray_train_workers']:.0f}"
        )
    if md.get("bottleneck"):
        parts.append(f"rank 0 {md['bottleneck']}")
    return "; ".join(parts) or md.get("error", "no profile")


def targets(res: dict) -> list[dict]:
    """Every target of every section as ``{section, name, target, measured, met, bottleneck}``."""
    out = []
    for name, wl in res["peers"].items():
        s = wl["summary"]
        first = len(out)
        for w in sorted(wl["mdlora"]):
            m = s[f"mdlora_vs_torchrec_w{w}"]
            out.append(
                _t(
                    "peers",
                    f"{name}: mdlora / raw TorchRec, world {w}",
                    f">= {PRETRAIN_VS_TORCHREC}",
                    m,
                    bool(m and m >= PRETRAIN_VS_TORCHREC),
                    _pretrain_why(wl, w),
                )
            )
        best = max(sorted(wl["mdlora"]), key=lambda w: s[f"mdlora_w{w}_vs_plain"] or 0)
        m = s[f"mdlora_w{best}_vs_plain"]
        out.append(
            _t(
                "peers",
                f"{name}: mdlora (world {best}) / plain PyTorch",
                f">= {PRETRAIN_VS_PLAIN}",
                m,
                bool(m and m >= PRETRAIN_VS_PLAIN),
                f"plain PyTorch reaches {s['plain_share_of_bound'] or 0:.0%} of the bound, raw "
                f"TorchRec w1 {s['torchrec_w1_share_of_bound'] or 0:.0%}: the fused TBE kernels "
                f"give less than 2x here; {_pretrain_why(wl, best)}",
            )
        )
        m = s["mdlora_w1_share_of_bound"]
        out.append(
            _t(
                "limit",
                f"{name}: mdlora world 1 share of the dense bound",
                f">= {BOUND_SHARE}",
                m,
                bool(m and m >= BOUND_SHARE),
                f"raw TorchRec w1 reaches {s['torchrec_w1_share_of_bound'] or 0:.0%}; {_pretrain_why(wl, '1')}",
            )
        )
        loads = [
            x
            for k in ("plain", "torchrec", "mdlora")
            for r in wl[k].values()
            for x in r.get("load") or []
        ]
        if loads and max(loads) > res["machine"]["cores"]:
            for t in out[first:]:  # these compare runs taken one after the other
                t["note"] = (
                    f"unreliable: 1-min load reached {max(loads):.0f} on {res['machine']['cores']} "
                    "cores, so the systems, run one after the other, saw different machines; "
                    "the step A/B ratio (same process, alternating blocks) stands"
                )
    sc = res["scaling"]
    for key, label, measured, bottleneck in (
        ("rows", "rows 1e5 -> 1e7: cost per row last / first", "cost_ratio_last_vs_first",
         "see rows table"),
        ("domains", "domains x10: adapter epoch ratio", "ratio_10x_domains",
         sc["domains"].get("bottleneck", "")),
        ("table_size", "table size: max bytes/rank at 2 workers / at 1", "max_rank_w2_vs_w1_worst",
         "planner placement"),
    ):
        out.append(_t("scaling", label, sc[key]["target"], sc[key][measured], sc[key]["met"], bottleneck))
    ad = res["adaptation"]
    for k, goal in GOALS.items():
        out.append(
            _t("adaptation", k, f"<= {goal:.4g}", ad["figures"][k], ad["met"][k], ad["bottleneck"])
        )
    out.append(
        _t(
            "adaptation",
            "epoch_ratio at the pretrain's batch size (2048 rows a step)",
            "(reported)",
            ad["epoch_ratio_at_pretrain_batch"],
            None,
        )
    )
    out.append(
        _t(
            "adaptation",
            "bundle bytes / backbone bytes",
            "(reported)",
            ad["bundle_size"]["ratio"],
            None,
        )
    )
    rd = res["reader"]
    for key, what in (
        ("local_shuffled", "local, shuffled (training path)"),
        ("local", "local, file order"),
        ("s3_shuffled", "S3 (moto on 127.0.0.1, in process), shuffled"),
    ):
        got = rd[
            f"{key.replace('_shuffled', '')}_e2e{'_shuffled' if 'shuffled' in key else ''}_rows_per_cpu_s"
        ]
        out.append(
            _t(
                "reader",
                f"Parquet -> KJT rows/s/core, {what}",
                f">= {READER_GOAL:.0e}",
                got,
                got >= READER_GOAL,
                rd["bottleneck"][key],
            )
        )
    so = res["scoring"]
    out.append(
        _t(
            "scoring",
            "rows/s with per-row adapters / backbone alone",
            so["target"],
            so["ratio_adapters_vs_backbone"],
            so["met"],
            so["bottleneck"],
        )
    )
    return out


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def markdown(res: dict) -> str:
    """Targets table, then each section's figures."""
    m = res["machine"]
    out = [
        f"# mdlora benchmark suite ({m['time_utc']}, {'quick' if res['quick'] else 'full'}, "
        f"{m['cores']} cores, load {m['loadavg'][0]:.1f} at start, "
        f"{m.get('loadavg_end', [0])[0]:.1f} at end)",
        "",
        "Ratios are taken within this run; absolute rates depend on the machine's load.",
        "",
        *[f"Section {name} rerun alone ({r['time_utc']}, load {r['loadavg'][0]:.1f} at start, "
          f"{r.get('loadavg_end', [0])[0]:.1f} at end).\n" for name, r in res.get("reruns", {}).items()],
        "| section | figure | target | measured | met | bottleneck (where missed) |",
        "|---|---|---|---|---|---|",
    ]
    for t in res["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        met += " (unreliable)" if t.get("note") else ""
        why = "; ".join(x for x in (t.get("note"), t["bottleneck"]) if x)
        out.append(
            f"| {t['section']} | {t['name']} | {t['target']} | {_num(t['measured'])} | {met} | {why} |"
        )
    for name, wl in res["peers"].items():
        bound = res["limit"][name]["bound"]["samples_per_s"]
        out += [
            "",
            f"## Peers: {name} ({wl['workload']['source']}, {wl['workload']['rows']:,} rows, "
            f"batch {wl['workload']['batch']}, bound {bound:,.0f} samples/s)",
            "",
            "| system | procs | threads | samples/s | share of bound | peak RSS MiB/proc | first batch s | load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = [(f"plain PyTorch ({v})", 1, r) for v, r in wl["plain"].items()]
        rows += [("raw TorchRec (torchrun)", w, r) for w, r in wl["torchrec"].items()]
        rows += [("mdlora pretrain (Ray Train, Parquet)", w, r) for w, r in wl["mdlora"].items()]
        for sys_name, w, r in rows:
            if "error" in r:
                out.append(f"| {sys_name} | {w} | | FAILED: {r['error']} | | | | |")
                continue
            rss = "/".join(f"{x:.0f}" for x in r.get("peak_rss_mb") or [])
            load = "-".join(f"{x:.1f}" for x in r.get("load") or [])
            out.append(
                f"| {sys_name} | {w} | {r.get('threads')} | {_num(rate(r))} | "
                f"{(rate(r) or 0) / bound:.1%} | {rss} | {_num(r.get('time_to_first_batch_s'))} | {load} |"
            )
        for w, ab in wl["ab"].items():
            if "error" not in ab:
                out.append(
                    f"\nStep A/B (world {w}, one torchrun group, alternating {ab['block']}-step blocks): "
                    f"raw TorchRec {ab['samples_per_s']['torchrec']:,.0f}, mdlora step "
                    f"{ab['samples_per_s']['mdlora']:,.0f} samples/s, ratio {ab['ratio']:.2f}."
                )
    b = res["limit"]["reference"]["bound"]
    out += [
        "",
        "## Limit",
        "",
        f"Reference tower: {b['flops_per_sample']:,.0f} FLOP/sample; GEMM {b['gemm_flops_1_thread'] / 1e9:.1f} "
        f"GFLOP/s on 1 thread ({b['gemm_flops_all_threads'] / 1e9:.1f} on all) -> bound "
        f"{b['samples_per_s']:,.0f} samples/s (cores x 1-thread rate).",
    ]
    sc = res["scaling"]
    out += [
        "",
        "## Scaling",
        "",
        "| rows | read us/row | train us/row | cost us/row |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {r['rows']:,} | {r['read_us_per_row']:.2f} | {r['train_us_per_row']:.2f} | "
        f"{r['cost_us_per_row']:.2f} |"
        for r in sc["rows"]["sizes"]
    ]
    out += ["", "| domains | rows | adapter epoch s | vs first |", "|---|---|---|---|"]
    out += [
        f"| {r['domains']} | {r['rows']:,} | {r['seconds']:.2f} | {r['ratio_vs_first']:.2f} |"
        for r in sc["domains"]["counts"]
    ]
    out += [
        "",
        "| rows/table | MiB/rank, 1 worker | MiB/rank, 2 workers | sharding (2) |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {r['rows_per_table']:,} | {max(r['bytes_per_rank_w1']) / 2**20:,.0f} | "
        f"{'/'.join(f'{x / 2**20:,.0f}' for x in r['bytes_per_rank_w2'])} | {r['sharding_w2']} |"
        for r in sc["table_size"]["sizes"]
    ]
    ad, rd, so = res["adaptation"], res["reader"], res["scoring"]
    out += [
        "",
        "## Adaptation, reader, scoring",
        "",
        f"Adaptation ({ad['train_rows']:,} train rows, {ad['domains']} domains): seconds "
        + ", ".join(f"{k} {v:.1f}" for k, v in ad["seconds"].items() if isinstance(v, float))
        + f"; bundle {ad['bundle_size']['bundle_bytes']:,} B vs backbone {ad['bundle_size']['backbone_bytes']:,} B.",
        "",
        f"Reader ({rd['rows']:,} rows, batch {rd['batch_size']}, 1 thread): "
        + ", ".join(
            f"{k} {v:,.0f}"
            for k, v in rd.items()
            if k.endswith("rows_per_s") or k.endswith("cpu_s")
        ),
        "",
        f"Scoring ({so['rows']:,} rows, {so['domains']} domains, {so['adapters_loaded']} bundles): "
        f"adapters {so['rows_per_s']['adapters']:,.0f} rows/s, backbone {so['rows_per_s']['backbone']:,.0f} rows/s.",
        "",
        "Section seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()),
        f"\nPlot: {res.get('plot') or 'not written (matplotlib missing)'}",
    ]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> str | None:
    """Four panels: samples/s vs bound, cost per row, adapter epoch vs domains, bytes per rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for i, (name, wl) in enumerate(res["peers"].items()):
        systems = [(f"plain {v}", r) for v, r in wl["plain"].items()]
        systems += [(f"torchrec w{w}", r) for w, r in wl["torchrec"].items()]
        systems += [(f"mdlora w{w}", r) for w, r in wl["mdlora"].items()]
        xs = [j + i * 0.4 for j in range(len(systems))]
        ax[0, 0].bar(xs, [rate(r) or 0 for _, r in systems], width=0.4, label=name)
        ax[0, 0].axhline(res["limit"][name]["bound"]["samples_per_s"], ls="--", color=f"C{i}")
        ax[0, 0].set_xticks(
            [j + 0.2 for j in range(len(systems))], [s for s, _ in systems], rotation=30
        )
    ax[0, 0].set(title="pretrain samples/s (dashed: dense bound)", ylabel="samples/s")
    ax[0, 0].legend()
    rows = res["scaling"]["rows"]["sizes"]
    ax[0, 1].plot([r["rows"] for r in rows], [r["cost_us_per_row"] for r in rows], "o-")
    ax[0, 1].set(
        xscale="log",
        title="cost per row (read + train)",
        xlabel="rows",
        ylabel="us/row",
        ylim=(0, None),
    )
    dom = res["scaling"]["domains"]["counts"]
    ax[1, 0].plot([r["domains"] for r in dom], [r["seconds"] for r in dom], "o-")
    ax[1, 0].set(
        xscale="log", title="adapter epoch vs domains (same rows)", xlabel="domains", ylabel="s"
    )
    tab = res["scaling"]["table_size"]["sizes"]
    for w in (1, 2):
        ax[1, 1].plot(
            [r["rows_per_table"] for r in tab],
            [max(r[f"bytes_per_rank_w{w}"]) / 2**30 for r in tab],
            "o-",
            label=f"{w} worker(s)",
        )
    ax[1, 1].set(
        xscale="log", yscale="log", title="embedding GiB per rank", xlabel="rows per table"
    )
    ax[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path.name
