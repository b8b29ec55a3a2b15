"""``mdlora retrain --window START..END``: scheduled retrain with a per-domain promotion gate.

Stages, each recorded in the run record as it finishes (a rerun after a failure resumes after
the last recorded stage, so no stage publishes twice):

1. **Backbone.** Pretrain on the window, warm-started from the production backbone
   (``model.init_from``, same architecture), and publish it as a new version: ``latest``, not
   ``production``.
2. **Rebase.** Train a fresh adapter of every domain against the new backbone and publish it
   without promoting (``mdlora.infra.adapt``): the domains of the new backbone's vocabulary on the
   window's logs, and every domain added by ``add-domain`` (a production bundle of this model,
   outside the vocabulary) on the logs its bundle records (``data_window``), in the same window.
   Adapters pinned to the old backbone are never loaded on the new one: bundles pin their
   backbone's content hash.
3. **Gate.** Score the fixed holdout ``gate.holdout`` with the champion (each domain's production
   bundle on the backbone it pins; a domain without one: the production backbone) and with the
   challenger (the new bundles on the new backbone), exact per-domain metrics
   (``mdlora.trainer.metrics``). An added domain without rows in ``gate.holdout`` is scored on the test
   split its logs have instead. A domain is promoted when its challenger is not worse than its
   champion by more than ``gate.tolerance``; a domain without a challenger or without holdout
   rows keeps its champion.
4. **Promote**, the only alias moves, all at the end: the promoted domains' bundles, then the
   backbone's ``production`` when at least one domain was promoted. A kept domain stays on its
   bundle pinned to the old backbone and ``mdlora.infra.score.Scorer`` serves it on that backbone, so
   serving is consistent after a partial promotion (and at every point of one). The backbone
   ``production`` alias therefore means "the newest backbone that serves at least one domain":
   the next retrain warm-starts from it and rows of domains without any bundle are scored on it.
5. **Report** ``report.md``, then ``report.json`` last: its presence marks the run done.

Idempotency: the run record lives in the registry, ``<root>/retrain/<model>/<START>_<END>-<key>/``
with ``key`` a hash of (model, window, config but ``lock_ttl`` and ``tracking``). Rerunning a finished run returns
its recorded report and creates nothing. A failed run leaves every ``production`` alias untouched
(its published versions stay ``latest`` only); its rerun reuses them: what a stage finished is in
``state.json``, and every version the run publishes records the run (manifest ``run``), so a run
killed after publishing but before recording finds its backbone and bundles again instead of
publishing them twice.

Lock: one retrain per model at a time (:class:`RetrainLock`); a second one is refused with
:class:`RetrainLocked` naming the holder.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from mdlora.atomic import write_bytes
from mdlora.config import to_dict
from mdlora.embeddings.batch import LogValidationError
from mdlora.infra import tracking
from mdlora.infra.adapt import NoTrainingRows, adapt
from mdlora.infra.artifacts import (
    ADAPTERS,
    BACKBONES,
    BundleManifest,
    Registry,
    find_backbone,
    open_backbone,
    open_bundles,
)
from mdlora.infra.logs import LogDataset
from mdlora.infra.pretrain import pretrain
from mdlora.infra.retrain_lock import RetrainLock, now
from mdlora.infra.runs import cache_dir, resolve_paths
from mdlora.infra.score import Scorer
from mdlora.infra.storage import is_s3, open_fs
from mdlora.trainer.config import AdaptOutputConfig, RetrainConfig

log = logging.getLogger("mdlora.retrain")


class Record:
    """The run record directory ``<root>/retrain/<model>/<name>/`` (local or S3)."""

    def __init__(self, root: str, model: str, name: str) -> None:
        self.fs, base = open_fs(root)
        self.local = not is_s3(root)
        self.name = name
        self.dir = f"{base.rstrip('/')}/retrain/{model}/{name}"

    def uri(self, file: str) -> str:
        """Where ``file`` of the record is, as the user sees it."""
        path = f"{self.dir}/{file}"
        return path if self.local else self.fs.unstrip_protocol(path)

    def read(self, file: str) -> dict | None:
        """A JSON file of the record, or None when absent."""
        self.fs.invalidate_cache(self.dir)
        try:
            return json.loads(self.fs.cat_file(f"{self.dir}/{file}"))
        except FileNotFoundError:
            return None

    def write(self, file: str, data: str | dict) -> None:
        """Write one file whole (local: temp + rename; S3: one PUT)."""
        body = (json.dumps(data, indent=2, sort_keys=True, default=str) if isinstance(data, dict) else data).encode()
        if self.local:
            write_bytes(f"{self.dir}/{file}", body)
        else:
            self.fs.pipe_file(f"{self.dir}/{file}", body)


def parse_window(window: str) -> tuple[str, str]:
    """``"2026-01-01..2026-01-07"`` -> its two dates (ValueError naming the bad window)."""
    try:
        start, end = (dt.date.fromisoformat(x.strip()) for x in window.split(".."))
    except ValueError:
        raise ValueError(f"--window {window!r}: expected YYYY-MM-DD..YYYY-MM-DD") from None
    if start > end:
        raise ValueError(f"--window {window!r}: starts after it ends")
    return str(start), str(end)


def retrain(cfg: RetrainConfig, window: str) -> dict:
    """Run (or resume, or return the recorded report of) the retrain of ``window``.

    Args:
        cfg: the retrain config.
        window: ``START..END`` (inclusive dates) of the new training data.

    Returns:
        The run report (``report.json``), with ``"rerun": True`` when it was already recorded.

    Raises:
        RetrainLocked: another retrain of the model runs, or this one lost its lock.
        FileNotFoundError: the holdout dataset does not exist.
    """
    start, end = parse_window(window)
    cfg = copy.deepcopy(cfg)
    resolve_paths(cfg.pretrain)
    if not is_s3(cfg.gate.holdout):
        cfg.gate.holdout = os.path.abspath(cfg.gate.holdout)
    root, model = cfg.pretrain.output.root, cfg.pretrain.output.model
    config = {k: v for k, v in to_dict(cfg).items() if k != "lock_ttl"}  # operational, not the model's
    for stage in ("pretrain", "adapt"):
        config[stage].pop("tracking")  # as is where it is tracked: the key of a window stays the same
    key = hashlib.sha256(json.dumps({"model": model, "window": f"{start}..{end}", "config": config},
                                    sort_keys=True).encode()).hexdigest()[:12]
    record = Record(root, model, f"{start}_{end}-{key}")
    with RetrainLock(root, model, {"run": record.name, "window": window}, cfg.lock_ttl) as lock:
        done = record.read("report.json")
        if done is not None:
            log.info("retrain %s already done: %s", record.name, record.uri("report.json"))
            return done | {"rerun": True}
        p = cfg.pretrain
        with tracking.track(p.tracking, p.output, job="retrain", name=record.name,
                            tags={"mdlora.run_key": _tag(model, record), "mdlora.data_window": f"{start}..{end}",
                                  "mdlora.record": record.uri("")}) as tracker:
            tracker.params(cfg)
            report = _run(cfg, f"{start}..{end}", record, lock)
            _track(tracker, report)
        return report


def _tag(model: str, record: Record) -> str:
    """The run key of a retrain: its Ray Train run, ``run`` in what it publishes, a tracking tag."""
    return f"retrain-{model}-{record.name}"


def _track(tracker: tracking.Tracker, report: dict) -> None:
    """The champion/challenger table (``report.md`` as an artefact, each side's holdout figures
    as ``gate/<domain>/<side>_<metric>``), the decisions and the versions it compared."""
    tracker.text(markdown(report), "retrain_report.md")
    figures = {}
    for d, r in report["domains"].items():
        for side in ("champion", "challenger"):
            figures |= {f"gate/{d}/{side}_{k}": r[side].get(k) for k in ("auc", "logloss", "ne", "calibration", "rows")}
        figures[f"gate/{d}/promoted"] = float(r["decision"] == "promote")
    tracker.metrics(figures | {"promoted_domains": len(report["promoted"]), "seconds": report["seconds"]})
    b, c = report["backbone"], report["champion"]
    tracker.tags({"mdlora.backbone_hash": b["content_hash"], "mdlora.backbone_version": b["version"],
                  "mdlora.champion_version": c["version"], "mdlora.champion_hash": c["content_hash"],
                  "mdlora.production_backbone": report["production_backbone"],
                  "mdlora.promoted": ",".join(report["promoted"]) or "none"}
                 | {f"mdlora.adapter.{d}.version": v for d, v in report.get("adapters", {}).items()})


def _run(cfg: RetrainConfig, window: str, record: Record, lock: RetrainLock) -> dict:
    p, t0 = cfg.pretrain, time.time()
    root, model, cache = p.output.root, p.output.model, cache_dir(p.output.run_dir)
    fs, path = open_fs(cfg.gate.holdout)
    if not fs.exists(path):
        raise FileNotFoundError(f"gate.holdout: {cfg.gate.holdout}: no such dataset")
    state = record.read("state.json") or {"run": record.name, "window": window, "started_at": now()}
    champion = open_backbone(root, model, state.get("champion", {}).get("version", "production"), cache)
    state["champion"] = {"version": champion.version, "content_hash": champion.content_hash}
    # every bundle the gate will score as champion, checked (files, pins) before anything trains
    production = {d: b.manifest for d, b in open_bundles(root, model, None, cache).items()}
    tag = _tag(model, record)
    if "backbone" not in state:
        run = copy.deepcopy(p)
        run.data.window, run.model = window, replace(champion.run.model, init_from=champion.version)
        out = find_backbone(root, model, tag) or pretrain(run, run_name=tag)
        state["backbone"] = {k: out[k] for k in ("version", "content_hash", "step", "metrics")}
        record.write("state.json", state)
    if "adapters" not in state:
        state.update(rebase(cfg, state["backbone"]["version"], window, tag, cache, production))
        record.write("state.json", state)
    if "domains" not in state:
        state["domains"] = evaluate(cfg, state, record, cache)
        record.write("state.json", state)
    lock.check()
    registry = Registry(*open_fs(root))
    promoted = sorted(d for d, r in state["domains"].items() if r["decision"] == "promote")
    for d in promoted:
        registry.promote(ADAPTERS, d, state["domains"][d]["challenger"]["adapter"])
    if promoted:
        registry.promote(BACKBONES, model, state["backbone"]["version"])
    report = {**state, "model": model, "run_key": record.name, "gate": to_dict(cfg.gate),
              "promoted": promoted, "backbone_promoted": bool(promoted),
              "production_backbone": registry.aliases(BACKBONES, model)["production"],
              "finished_at": now(), "seconds": round(time.time() - t0, 1), "record": record.uri(""),
              "rerun": False}
    record.write("report.md", markdown(report))
    record.write("report.json", report)
    log.info("retrain %s: promoted %s; backbone production %s", record.name, promoted or "nothing",
             report["production_backbone"])
    return report


def rebase(cfg: RetrainConfig, version: str, window: str, tag: str, cache: Path,
           production: dict[str, BundleManifest]) -> dict:
    """Stage 2: an adapter of every domain on backbone ``version``, published unpromoted with
    ``run = tag``; bundles an earlier attempt of the run published are reused. Domains added by
    ``add-domain`` are the ``production`` bundles (checked, on a ``model`` backbone) outside the
    backbone schema's vocabulary.

    Returns:
        ``{"adapters": {domain: version}, "skipped_no_rows": [domain], "not_rebased": {domain:
        reason}, "holdouts": {added domain: its test split or ''}}``.
    """
    p = cfg.pretrain
    root, model = p.output.root, p.output.model
    acfg = copy.deepcopy(cfg.adapt)
    acfg.data = replace(acfg.data, schema=p.data.schema, train=p.data.train, val=p.data.val, window=window)
    acfg.output = AdaptOutputConfig(root=root, model=model, run_dir=p.output.run_dir, backbone=version)
    acfg.tracking = p.tracking  # the same experiment as the retrain and its backbone
    registry = Registry(*open_fs(root))
    wanted = set(acfg.data.domains or [])
    schema = open_backbone(root, model, version, cache).schema
    vocabulary = schema.domain.values
    natural = [d for d in vocabulary if not wanted or d in wanted]
    added = {d: m for d, m in production.items() if d not in vocabulary and (not wanted or d in wanted)}
    done = {d: v for d in natural + list(added) if (v := registry.find(ADAPTERS, d, "run", tag))}
    out = {"adapters": dict(done), "skipped_no_rows": [], "not_rebased": {},
           "holdouts": {d: m.data_window.get("test", "") for d, m in added.items()}}
    if done:
        log.info("retrain %s: reusing the bundles it already published: %s", tag, done)

    shared = None  # MultiLoRA: the rest train against the aux LoRA state this run's bundles share
    if acfg.lora.method == "multilora" and done:
        d, v = min(done.items())
        shared = open_bundles(root, model, {d: v}, cache)[d].shared
    todo = [d for d in natural if d not in done]
    extra = {}  # the added domains to rebase: their logs exist and can be windowed
    for d, m in sorted(added.items()):
        if d in done:
            continue
        splits = {k: v for k, v in m.data_window.items() if k in ("train", "validation", "test", "all")}
        if not splits:
            out["not_rebased"][d] = "its production bundle records no training logs"
            continue
        try:
            for uri in splits.values():
                LogDataset(uri, schema.with_domains([d]), window=window)
        except (FileNotFoundError, LogValidationError) as e:  # its logs went away or cannot be windowed
            log.warning("retrain %s: added domain %s not rebased: %s", tag, d, e)
            out["not_rebased"][d] = f"not rebased: {e}"
            continue
        extra[d] = splits
    if todo or extra:  # one materialisation for them all
        try:
            r = adapt(acfg, todo, added=extra, promote_new=False, run=tag, shared=shared)
        except NoTrainingRows:
            out["skipped_no_rows"] += todo + sorted(extra)
        else:
            out["adapters"] |= {d: b["version"] for d, b in r["bundles"].items()}
            out["skipped_no_rows"] += r["skipped_no_rows"]
    return out


def evaluate(cfg: RetrainConfig, state: dict, record: Record, cache: Path) -> dict[str, dict]:
    """Champion vs challenger on the holdout, per domain, and the gate's decision for each."""
    root, model = cfg.pretrain.output.root, cfg.pretrain.output.model
    champion = Scorer(root, model, state["champion"]["version"], cache_dir=cache)
    challenger = Scorer(root, model, state["backbone"]["version"], bundles=state["adapters"], cache_dir=cache)

    def score(scorer: Scorer, data: str, name: str) -> dict:  # per-domain figures; predictions in the record
        return scorer.score_dataset(data, record.uri(name), cfg.gate.score, cfg.pretrain.dist.address)["domains"]

    old = score(champion, cfg.gate.holdout, "champion.parquet")
    new = score(challenger, cfg.gate.holdout, "challenger.parquet")
    holdout = {d: cfg.gate.holdout for d in set(old) | set(new)}
    for d, test in sorted(state.get("holdouts", {}).items()):  # added domains: their own test split
        if test and d not in holdout and d in state["adapters"]:
            old[d] = score(champion, test, f"champion-{d}.parquet").get(d, {})
            new[d] = score(challenger, test, f"challenger-{d}.parquet").get(d, {})
            holdout[d] = test
    out = {}
    for d in sorted(set(old) | set(champion.versions) | set(state["adapters"])):
        out[d] = {"champion": _side(champion, old, d), "challenger": _side(challenger, new, d),
                  "holdout": holdout.get(d, "")}
        out[d]["decision"], out[d]["reason"] = _decide(cfg, out[d], state, d)
    return out


def _side(scorer: Scorer, scores: dict, domain: str) -> dict:
    """What served ``domain`` on one side (adapter, backbone) and its holdout figures (AUC, LogLoss,
    NE, calibration: :mod:`mdlora.trainer.metrics`)."""
    r = scores.get(domain, {})
    return {"adapter": scorer.versions.get(domain), "backbone": scorer.backbone_of.get(domain, scorer.info.version),
            "rows": r.get("rows", 0)} | {k: r.get(k) for k in ("auc", "logloss", "ne", "calibration")}


def _decide(cfg: RetrainConfig, r: dict, state: dict, domain: str) -> tuple[str, str]:
    """``("promote" | "keep", reason)`` of one domain."""
    metric, tol = cfg.gate.metric, cfg.gate.tolerance
    a, b = r["champion"][metric], r["challenger"][metric]
    if r["challenger"]["adapter"] is None:
        if domain in state["skipped_no_rows"]:
            return "keep", "no training rows in the window"
        return "keep", state.get("not_rebased", {}).get(
            domain, "not rebased (outside the new backbone's domains or adapt.data.domains)")
    if r["challenger"]["rows"] == 0:
        return "keep", "no holdout rows" + ("" if domain not in state.get("holdouts", {})
                                             else " (not in gate.holdout, and its logs have no test split)")
    if a is None or b is None:
        return "keep", f"holdout {metric} undefined (one class only)"
    bound = a - tol if metric == "auc" else a + tol  # AUC: higher is better; LogLoss: lower
    ok = b >= bound if metric == "auc" else b <= bound
    rel = {("auc", True): ">=", ("auc", False): "<", ("logloss", True): "<=", ("logloss", False): ">"}[metric, ok]
    op = "-" if metric == "auc" else "+"
    return ("promote" if ok else "keep"), f"challenger {metric} {b:.4f} {rel} champion {a:.4f} {op} {tol:g} = {bound:.4f}"


def markdown(report: dict) -> str:
    """The run report as Markdown: versions, gate, one row per domain."""
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    b, c = report["backbone"], report["champion"]
    lines = [f"# Retrain {report['model']} {report['window']}", "",
             f"Run `{report['run_key']}`. Champion backbone {c['version']}; challenger {b['version']} "
             f"(warm-started from {c['version']}, step {b['step']}). Backbone production now "
             f"{report['production_backbone']} ({'promoted' if report['backbone_promoted'] else 'kept'}).", "",
             f"Gate: {report['gate']['metric']} on `{report['gate']['holdout']}`, tolerance "
             f"{report['gate']['tolerance']:g}.", "",
             "| domain | holdout rows | champion | AUC | LogLoss | NE | Calibration "
             "| challenger | AUC | LogLoss | NE | Calibration | decision | reason |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for d, r in report["domains"].items():
        old, new = r["champion"], r["challenger"]
        # .get: a run resumed from a state.json written before NE and calibration were recorded
        side = lambda s: (f"{s['adapter'] or 'backbone only'} @ {s['backbone']} | "  # noqa: E731
                          + " | ".join(f(s.get(k)) for k in ("auc", "logloss", "ne", "calibration")))
        lines.append(f"| {d} | {old['rows']:,} | {side(old)} | {side(new)} | {r['decision']} | {r['reason']} |")
    own = {d: r["holdout"] for d, r in report["domains"].items()
           if r.get("holdout") and r["holdout"] != report["gate"]["holdout"]}
    if own:
        lines += ["", "Domains added by `add-domain` are rebased on their own logs; those without rows in "
                  "the holdout were gated on their own test split:", ""]
        lines += [f"- {d}: `{path}`" for d, path in sorted(own.items())]
    return "\n".join(lines) + "\n"
