"""``mdlora retrain --window START..END``: scheduled retrain with a per-domain promotion gate.

Stages, each recorded in the run record as it finishes (a rerun after a failure resumes after
the last recorded stage, so no stage publishes twice):

1. **Backbone.** Pretrain on the window, warm-started from the production backbone
   (``model.init_from``, same architecture), and publish it as a new version: ``latest``, not
   ``production``.
2. **Rebase.** Train a fresh adapter of every domain of the new backbone's vocabulary against it
   (``infra.adapt``: materialise, train, publish without promoting). Adapters pinned to the old
   backbone are never loaded on the new one: bundles pin their backbone's content hash.
3. **Gate.** Score the fixed holdout ``gate.holdout`` with the champion (each domain's production
   bundle on the backbone it pins; a domain without one: the production backbone) and with the
   challenger (the new bundles on the new backbone), exact per-domain metrics
   (``trainer.metrics``). A domain is promoted when its challenger is not worse than its champion
   by more than ``gate.tolerance``; a domain without a challenger or without holdout rows keeps
   its champion.
4. **Promote**, the only alias moves, all at the end: the promoted domains' bundles, then the
   backbone's ``production`` when at least one domain was promoted. A kept domain stays on its
   bundle pinned to the old backbone and ``infra.score.Scorer`` serves it on that backbone, so
   serving is consistent after a partial promotion (and at every point of one). The backbone
   ``production`` alias therefore means "the newest backbone that serves at least one domain":
   the next retrain warm-starts from it and rows of domains without any bundle are scored on it.
5. **Report** ``report.md``, then ``report.json`` last: its presence marks the run done.

Idempotency: the run record lives in the registry, ``<root>/retrain/<model>/<START>_<END>-<key>/``
with ``key`` a hash of (model, window, config). Rerunning a finished run returns its recorded
report and creates nothing. A failed run leaves every ``production`` alias untouched (its
published versions stay ``latest`` only); its rerun reuses them.

Lock: one retrain per model at a time (:class:`RetrainLock`); a second one is refused with
:class:`RetrainLocked` naming the holder.
"""

from __future__ import annotations

import copy
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

from adapters.registry import Registry, _precondition_failed
from infra.adapt import adapt, open_backbone
from infra.pretrain import cache_dir, pretrain, resolve_paths
from infra.score import Scorer
from infra.storage import is_s3, open_fs
from mdlora.atomic import write_bytes
from mdlora.config import to_dict
from mdlora.names import check_name
from trainer.config import AdaptOutputConfig, RetrainConfig

log = logging.getLogger("mdlora.retrain")


class RetrainLocked(RuntimeError):
    """Another retrain of the same model holds the lock, or this run lost it."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RetrainLock:
    """Exclusive lock on the retrains of ``model`` in the registry at ``root``.

    * **Local** registries: ``fcntl.flock`` on ``<root>/retrain/<model>/.lock`` (as the registry
      serialises its alias updates). The kernel releases it when the holder exits or dies, so a
      crashed run never leaves a stale lock; the file names the last holder, nothing more.
    * **S3** registries: a lease object ``<root>/retrain/<model>/lock.json`` created with
      ``If-None-Match: *``; the holder renews its ``expires`` every ``ttl / 3`` seconds with
      ``If-Match`` on its ETag (the registry's compare-and-swap). A lease past ``expires`` (its
      holder crashed) is taken over with ``If-Match`` on the stale ETag. To recover a crashed
      holder's lease before it expires, delete ``lock.json`` (after checking the holder it names
      is gone). A holder whose lease was taken over fails in :meth:`check`, before any alias moves.

    Args:
        root: registry root (local dir or s3://).
        model: backbone name.
        owner: what to tell a refused retrain about this holder (run, window).
        ttl: S3 lease seconds.
    """

    def __init__(self, root: str, model: str, owner: dict, ttl: float) -> None:
        self.fs, base = open_fs(root)
        self.local = not is_s3(root)
        self.path = f"{base.rstrip('/')}/retrain/{check_name(model, 'model')}/" + (".lock" if self.local else "lock.json")
        self.uri = self.path if self.local else self.fs.unstrip_protocol(self.path)
        self.owner = {**owner, "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        self.ttl = ttl
        self._file, self._etag, self._lost = None, None, None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _refuse(self, holder: str) -> RetrainLocked:
        how = ("it is released when that process exits" if self.local else
               f"the lease expires unless renewed (ttl {self.ttl:.0f} s); if its holder is gone, delete {self.uri}")
        return RetrainLocked(f"another retrain of this model is running: lock {self.uri} is held by {holder} ({how})")

    def acquire(self) -> None:
        """Take the lock or raise :class:`RetrainLocked` naming the holder."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # held open (and locked) until release()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise self._refuse(holder) from None
            f.truncate(0)
            f.write(json.dumps(self.owner))
            f.flush()
            self._file = f
            return
        try:
            self.fs.pipe_file(self.path, self._lease(), mode="create")
        except OSError as e:
            if not _precondition_failed(e):
                raise
            self._take_over()
        self._etag = self._current_etag()
        self._beat = threading.Thread(target=self._renew, name="retrain-lock", daemon=True)
        self._beat.start()

    def _lease(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.ttl}).encode()

    def _current_etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.info(self.path)["ETag"]
        except FileNotFoundError:
            return None

    def _take_over(self) -> None:
        """Replace an expired S3 lease (compare-and-swap on its ETag) or refuse."""
        etag = self._current_etag()
        holder = json.loads(self.fs.cat_file(self.path)) if etag else {}
        if etag and holder.get("expires", 0) > time.time():
            raise self._refuse(json.dumps(holder))
        try:
            if etag is None:
                self.fs.pipe_file(self.path, self._lease(), mode="create")
            else:
                self.fs.pipe_file(self.path, self._lease(), IfMatch=etag)
        except OSError as e:
            if not _precondition_failed(e):
                raise
            raise self._refuse("a retrain that took the expired lease first") from None
        log.warning("took over the expired retrain lock %s of %s", self.uri, holder)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.fs.pipe_file(self.path, self._lease(), IfMatch=self._etag)
                self._etag = self._current_etag()
            except OSError as e:
                self._lost = e
                return

    def check(self) -> None:
        """Raise :class:`RetrainLocked` when this holder no longer owns the lock (S3)."""
        if self.local:
            return
        if self._lost is not None or self._current_etag() != self._etag:
            raise RetrainLocked(f"lost the retrain lock {self.uri} (taken over or deleted); nothing promoted")

    def release(self) -> None:
        """Release the lock (S3: delete the lease if it is still ours)."""
        if self.local:
            if self._file is not None:
                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._lost is None and self._current_etag() == self._etag:
            self.fs.rm_file(self.path)

    def __enter__(self) -> RetrainLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
    key = hashlib.sha256(json.dumps({"model": model, "window": f"{start}..{end}", "config": to_dict(cfg)},
                                    sort_keys=True).encode()).hexdigest()[:12]
    record = Record(root, model, f"{start}_{end}-{key}")
    with RetrainLock(root, model, {"run": record.name, "window": window}, cfg.lock_ttl) as lock:
        done = record.read("report.json")
        if done is not None:
            log.info("retrain %s already done: %s", record.name, record.uri("report.json"))
            return done | {"rerun": True}
        return _run(cfg, f"{start}..{end}", record, lock)


def _run(cfg: RetrainConfig, window: str, record: Record, lock: RetrainLock) -> dict:
    p, t0 = cfg.pretrain, time.time()
    root, model, cache = p.output.root, p.output.model, cache_dir(p.output.run_dir)
    fs, path = open_fs(cfg.gate.holdout)
    if not fs.exists(path):
        raise FileNotFoundError(f"gate.holdout: {cfg.gate.holdout}: no such dataset")
    state = record.read("state.json") or {"run": record.name, "window": window, "started_at": _now()}
    champion = open_backbone(root, model, state.get("champion", {}).get("version", "production"), cache)
    state["champion"] = {"version": champion.version, "content_hash": champion.content_hash}
    if "backbone" not in state:
        run = copy.deepcopy(p)
        run.data.window, run.model = window, replace(champion.run.model, init_from=champion.version)
        out = pretrain(run, run_name=f"retrain-{model}-{record.name}")
        state["backbone"] = {k: out[k] for k in ("version", "content_hash", "step", "metrics")}
        record.write("state.json", state)
    if "adapters" not in state:
        acfg = copy.deepcopy(cfg.adapt)
        acfg.data = replace(acfg.data, schema=p.data.schema, train=p.data.train, val=p.data.val, window=window)
        acfg.output = AdaptOutputConfig(root=root, model=model, run_dir=p.output.run_dir,
                                        backbone=state["backbone"]["version"])
        out = adapt(acfg, promote_new=False)
        state["adapters"] = {d: b["version"] for d, b in out["bundles"].items()}
        state["skipped_no_rows"] = out["skipped_no_rows"]
        record.write("state.json", state)
    if "domains" not in state:
        state["domains"] = evaluate(cfg, state, record, cache)
        record.write("state.json", state)
    lock.check()
    registry = Registry(*open_fs(root))
    promoted = sorted(d for d, r in state["domains"].items() if r["decision"] == "promote")
    for d in promoted:
        registry.promote("adapters", d, state["domains"][d]["challenger"]["adapter"])
    if promoted:
        registry.promote("backbones", model, state["backbone"]["version"])
    report = {**state, "model": model, "run_key": record.name, "gate": to_dict(cfg.gate),
              "promoted": promoted, "backbone_promoted": bool(promoted),
              "production_backbone": registry.aliases("backbones", model)["production"],
              "finished_at": _now(), "seconds": round(time.time() - t0, 1), "record": record.uri(""),
              "rerun": False}
    record.write("report.md", markdown(report))
    record.write("report.json", report)
    log.info("retrain %s: promoted %s; backbone production %s", record.name, promoted or "nothing",
             report["production_backbone"])
    return report


def evaluate(cfg: RetrainConfig, state: dict, record: Record, cache: Path) -> dict[str, dict]:
    """Champion vs challenger on the holdout, per domain, and the gate's decision for each."""
    root, model = cfg.pretrain.output.root, cfg.pretrain.output.model
    champion = Scorer(root, model, state["champion"]["version"], cache_dir=cache)
    challenger = Scorer(root, model, state["backbone"]["version"], bundles=state["adapters"], cache_dir=cache)
    old = champion.score_dataset(cfg.gate.holdout, record.uri("champion.parquet"))["domains"]
    new = challenger.score_dataset(cfg.gate.holdout, record.uri("challenger.parquet"))["domains"]
    out = {}
    for d in sorted(set(old) | set(champion.versions) | set(state["adapters"])):
        out[d] = {"champion": _side(champion, old, d), "challenger": _side(challenger, new, d)}
        out[d]["decision"], out[d]["reason"] = _decide(cfg, out[d], d in state["skipped_no_rows"])
    return out


def _side(scorer: Scorer, scores: dict, domain: str) -> dict:
    """What served ``domain`` on one side (adapter, backbone) and its holdout figures."""
    r = scores.get(domain, {})
    return {"adapter": scorer.versions.get(domain), "backbone": scorer.backbone_of.get(domain, scorer.info.version),
            "rows": r.get("rows", 0), "auc": r.get("auc"), "logloss": r.get("logloss")}


def _decide(cfg: RetrainConfig, r: dict, no_rows: bool) -> tuple[str, str]:
    """``("promote" | "keep", reason)`` of one domain."""
    metric, tol = cfg.gate.metric, cfg.gate.tolerance
    a, b = r["champion"][metric], r["challenger"][metric]
    if r["challenger"]["adapter"] is None:
        return "keep", ("no training rows in the window" if no_rows
                        else "not rebased (outside the new backbone's domains or adapt.data.domains)")
    if r["challenger"]["rows"] == 0:
        return "keep", "no holdout rows"
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
             "| domain | holdout rows | champion | AUC | LogLoss | challenger | AUC | LogLoss | decision | reason |",
             "|---|---:|---|---:|---:|---|---:|---:|---|---|"]
    for d, r in report["domains"].items():
        old, new = r["champion"], r["challenger"]
        name = lambda s: f"{s['adapter'] or 'backbone only'} @ {s['backbone']}"  # noqa: E731
        lines.append(f"| {d} | {old['rows']:,} | {name(old)} | {f(old['auc'])} | {f(old['logloss'])} | {name(new)} | "
                     f"{f(new['auc'])} | {f(new['logloss'])} | {r['decision']} | {r['reason']} |")
    return "\n".join(lines) + "\n"
