"""Scoring: each domain's production adapter on the backbone it pins, per-row routing.

Python API::

    scorer = Scorer("registry", "ctr")                    # production bundles + their pinned backbones
    probs = scorer.score_table(arrow_table)               # float32 [N], rows in input order
    summary = scorer.score_dataset("logs/test", "preds.parquet")                  # this process
    summary = scorer.score_dataset("logs/test", "preds", ScoreConfig(workers=4))  # 4 Ray tasks

A dataset is scored row group by row group, in this process or spread over Ray tasks
(:meth:`Scorer.score_dataset`; output layout and commit: :mod:`mdlora.infra.score_output`).

Every bundle pins the backbone it was trained on (manifest ``backbone``: name, version, content
hash). The scorer loads each distinct pinned backbone once and routes a domain's rows to its
bundle on that backbone, so domains whose production bundles pin different backbone versions
(a scheduled retrain promoted some domains and kept others) are all served as trained. Rows of a
domain without a bundle (or unknown to the schema) get ``backbone_ref`` alone and are counted as
fallback rows. Loading refuses (``BundleError``) a bundle whose pinned backbone content hash or
schema hash does not match the loaded backbone, one pinned to another backbone name, or a
tampered one: an adapter is never run on a backbone it was not trained on. Backbones are read
from their DCP shards into world-1 models (``mdlora.trainer.recipes.load_unsharded``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mdlora.adapters.config import LoraConfig
from mdlora.adapters.inject import AdaptedModel, inject
from mdlora.config import from_dict, to_dict
from mdlora.embeddings.batch import BatchConverter, LogValidationError
from mdlora.embeddings.schema import Schema
from mdlora.infra import ray_backend, tracking
from mdlora.infra.artifacts import BackboneInfo, Bundle, BundleError, open_backbone, open_bundles
from mdlora.infra.logs import LogDataset, Piece, read_piece
from mdlora.infra.score_output import Scores, domains_needed, local_file, partition, staged_output
from mdlora.infra.storage import is_s3
from mdlora.progress import Progress
from mdlora.trainer.config import AdaptConfig, ScoreConfig
from mdlora.trainer.features import wide_ids, wide_spec
from mdlora.trainer.metrics import DomainMetrics, format_table
from mdlora.trainer.recipes import load_unsharded

ROWS = 65536
SCORES = ("auc", "logloss", "ne", "calibration")  # per-domain figures of a labelled summary


@dataclass
class Served:
    """One loaded backbone version with the adapters of the domains pinned to it."""

    info: BackboneInfo
    schema: Schema
    """The backbone's schema, domain vocabulary extended by its bundles' domains."""
    backbone: torch.nn.Module
    adapted: AdaptedModel | None
    """Adapters of this backbone's domains (slot order = ``adapted.domain_names``); None: none."""
    aux_col: int | None = None
    """MultiLoRA: index of the aux division the adapters route on."""

    @torch.no_grad()
    def score(self, table: pa.Table, slots: np.ndarray, names: list[str]) -> np.ndarray:
        """Probabilities float32 [N] of ``table`` with local adapter slots int64 [N] (-1: none)."""
        conv = BatchConverter(self.schema.with_domains(names))
        probs = np.zeros(table.num_rows, np.float32)
        for lo in range(0, table.num_rows, ROWS):
            batch = conv.convert(table.slice(lo, ROWS).combine_chunks())
            if self.adapted is None:
                logits = self.backbone(batch.sparse, batch.dense)
            else:
                aux = None if self.aux_col is None else batch.aux[:, self.aux_col]
                spec = self.adapted.wide
                wide = None if spec is None else (wide_ids(spec, batch.sparse), batch.dense)
                logits = self._routed_head(self.backbone.embed(batch.sparse, batch.dense),
                                           torch.from_numpy(slots[lo:lo + ROWS]), aux, wide)
            probs[lo:lo + len(batch)] = torch.sigmoid(logits).numpy()
        return probs

    def _routed_head(self, x: torch.Tensor, slots: torch.Tensor, aux: torch.Tensor | None,
                     wide: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Logits [N] of embedding outputs ``x`` [N, E], each row through its own adapter
        (``wide``: the rows' ids and dense block, for a wide adapter).

        Rows are grouped by (domain, aux) slot so each group takes the adapters' single-slot
        fast path: on CPU a mixed batch's per-row masking cost 2.6x the tower, grouping 1.15x.
        """
        key = slots if aux is None else slots * (int(aux.max()) + 2) + aux + 1
        order = torch.argsort(key, stable=True)
        logits = torch.empty(len(x))
        for idx in torch.split(order, torch.unique_consecutive(key[order], return_counts=True)[1].tolist()):
            with self.adapted.routing(slots[idx], None if aux is None else aux[idx],
                                      None if wide is None else (wide[0][idx], wide[1][idx])):
                logits[idx] = self.backbone.head(x[idx])
        return logits


def _serve(info: BackboneInfo, loaded: dict[str, Bundle]) -> Served:
    """Load ``info``'s backbone and inject ``loaded``'s adapters (one LoRA config per backbone)."""
    schema = info.schema.with_domains(sorted(loaded))
    served = Served(info, schema, load_unsharded(info.path, schema, info.run.model).backbone, None)
    if not loaded:
        return served
    configs = {d: from_dict(LoraConfig, b.manifest.lora) for d, b in loaded.items()}  # defaults filled in
    lora = next(iter(configs.values()))
    if any(c != lora for c in configs.values()):
        raise ValueError(f"bundles: LoRA configs differ across domains on backbone {info.version} {configs}; "
                         "score them separately")
    aux_values = None
    if lora.method == "multilora":
        served.aux_col = [a.name for a in schema.aux].index(lora.aux)
        aux_values = schema.aux[served.aux_col].values
    served.adapted = inject(served.backbone, lora, list(loaded), aux_values, root="tower",
                            wide=wide_spec(schema, lora))
    shared = None
    for d, b in loaded.items():
        if shared is not None and any(not torch.equal(shared[k], b.shared[k]) for k in shared):
            raise BundleError(f"adapters/{d} {b.manifest.version}: its shared aux LoRA differs from the other "
                              "domains' bundles (trained in another adapt run); score them separately")
        shared = b.shared
        served.adapted.load_state_for(d, b.tensors)
    if lora.method == "multilora":
        served.adapted.load_shared_state(shared)
    return served


class Scorer:
    """Per-domain adapters, each on the backbone version it pins, ready to score mixed-domain rows.

    Args:
        root: registry root (local dir or s3://).
        model: backbone name.
        backbone_ref: backbone alias or version for rows without an adapter (fallback rows).
        bundles: ``{domain: version or alias}`` to load; None: the production bundle of every
            domain that has one pinned to a ``model`` backbone.
        cache_dir: where S3 artefacts are downloaded (None: a temp dir removed with the scorer;
            the loaded weights stay in memory).

    Attributes:
        versions: ``{domain: adapter version}`` of the loaded bundles.
        backbone_of: ``{domain: backbone version}`` each loaded bundle runs on.

    Raises:
        BundleError: a bundle does not match its pinned backbone or the schema, pins a backbone of
            another name, or is corrupt.
        ValueError: bundles on one backbone disagree on their LoRA config.
    """

    def __init__(self, root: str, model: str, backbone_ref: str = "production",
                 bundles: dict[str, str] | None = None, cache_dir: str | Path | None = None) -> None:
        self.root, self.model = root, model
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="mdlora-score-")  # removed with self
        cache = Path(cache_dir or self._tmp.name)
        self.info = open_backbone(root, model, backbone_ref, cache)
        infos = {self.info.version: self.info}
        groups: dict[str, dict[str, Bundle]] = {self.info.version: {}}
        for d, bundle in open_bundles(root, model, bundles, cache).items():  # checked against their pins
            v = bundle.manifest.backbone.version
            if v not in infos:
                infos[v] = open_backbone(root, model, v, cache)
            groups.setdefault(v, {})[d] = bundle
        self.versions = {d: b.manifest.version for g in groups.values() for d, b in g.items()}
        self.backbone_of = {d: v for v, g in groups.items() for d in g}
        self.served = {v: _serve(infos[v], g) for v, g in sorted(groups.items())}
        self.slot = {d: i for i, d in enumerate(sorted(self.versions))}
        self.schema = self.info.schema.with_domains(sorted(self.versions))

    def score(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities float32 [N] and adapter slots int64 [N] (index into ``sorted(versions)``,
        -1: fallback on ``backbone_ref`` alone) of ``table``'s rows, in order."""
        s = self.schema
        domains = pc.cast(table.column(s.domain.column), pa.string())
        names = [str(v) for v in pc.unique(domains).to_pylist()]
        index = pc.fill_null(pc.index_in(domains, pa.array(names, pa.string())), len(names)).to_numpy()
        slots = np.array([self.slot.get(n, -1) for n in names] + [-1], dtype=np.int64)[index]
        if s.label not in table.column_names:
            table = table.append_column(s.label, pa.array(np.zeros(table.num_rows, np.int8)))
        probs = np.zeros(table.num_rows, np.float32)
        versions = list(self.served)
        own = [self.backbone_of.get(n, self.info.version) for n in names] + [self.info.version]
        group = np.array([versions.index(v) for v in own], np.int64)[index]  # [N] backbone of each row
        local = np.array([self.served[self.backbone_of[n]].adapted.domain_names.index(n)
                          if n in self.backbone_of else -1 for n in names] + [-1], np.int64)[index]  # [N]
        for g, served in enumerate(self.served.values()):
            rows = np.flatnonzero(group == g)
            if rows.size:
                sub = table if rows.size == table.num_rows else table.take(pa.array(rows))
                probs[rows] = served.score(sub, local[rows], names)
        return probs, slots

    def score_table(self, table: pa.Table) -> np.ndarray:
        """Click probabilities float32 [N] of ``table``'s rows, in order."""
        return self.score(table)[0]

    def score_dataset(self, data: str, out: str, score: ScoreConfig | None = None, address: str = "") -> dict:
        """Score a Parquet dataset (file or dir, local or s3://) and write predictions atomically.

        Rows are read row group by row group (memory bounded by the batch, not the input). With
        ``score.workers`` 1 they are scored here and written as one Parquet file; with more,
        the row groups are cut into contiguous shares scored by Ray tasks (each loads the
        backbones and the bundles its rows need: all of them unless the shares' domains are
        known from hive partitions or row-group statistics), written as ``out/part-NNNNN.parquet``
        + ``_SUCCESS`` and committed at once (layout: :mod:`mdlora.infra.score_output`). The
        tasks serve the versions this scorer resolved, so a promotion during the job cannot
        mix versions. Every part holds, in input order (files by path, then row order):
        ``domain``, the label column when present, ``prob``, ``adapter_version`` ('' on
        fallback rows) and ``backbone_version``.

        Args:
            data: the dataset.
            out: the output file (one worker) or directory (more), local or s3://.
            score: workers and CPUs per worker (default: one worker, in this process).
            address: Ray cluster address ('' : ``RAY_ADDRESS`` or an embedded Ray).

        Returns:
            ``{"rows", "fallback_rows", "backbone", "domains": {name: {"rows", "adapter_version",
            "backbone_version", "auc", "logloss", "ne", "calibration"}}, "auc", "logloss", "ne",
            "calibration", "wauc", "table", "out", "workers": [{"rows", "seconds", "peak_rss_mb"}]}``
            (metrics and table only when labelled; exact over all rows whatever the number of
            workers; definitions in :mod:`mdlora.trainer.metrics`).

        Raises:
            ValueError: no rows; :class:`~mdlora.infra.logs.LogReadError` /
                ``LogValidationError`` naming the file a part could not read or score.
        """
        score = score or ScoreConfig()
        logs = LogDataset(data, self.schema)
        pieces = logs.fragments()
        if not pieces:
            raise ValueError(f"{data}: no rows to score")
        workers = score.workers
        if workers != 1:
            ray_backend.init_ray(address)
            workers = workers or max(1, ray_backend.available_cpus() // score.cpus_per_worker)
        shares = partition(pieces, workers)
        with staged_output(out, len(shares) if workers > 1 else 0) as dests:
            if workers == 1:
                with _threads(score.cpus_per_worker):
                    parts = [self._score_pieces(pieces, logs.scan, dests[0], Progress(f"score {data}", logs.num_rows()))]
            else:
                specs = [self._spec(share, logs.scan, dest, score.cpus_per_worker)
                         for share, dest in zip(shares, dests, strict=True)]
                parts = ray_backend.map_tasks(_score_task, specs, num_cpus=score.cpus_per_worker)
        summary = self._summary(Scores.concat(parts), self.schema.label in logs.columns, out)
        return summary | {"workers": [{"rows": p.rows, "seconds": p.seconds, "peak_rss_mb": p.peak_rss_mb} for p in parts]}

    def _spec(self, pieces: list[Piece], scan: dict, dest: str, threads: int) -> dict:
        """What a task needs to score ``pieces`` with this scorer's resolved versions."""
        need = domains_needed(pieces, self.schema.domain.column)
        bundles = dict(self.versions) if need is None else {d: v for d, v in self.versions.items() if d in need}
        root = self.root if is_s3(self.root) else os.path.abspath(self.root)  # tasks have another cwd
        return {"root": root, "model": self.model, "backbone": self.info.version, "bundles": bundles,
                "pieces": pieces, "scan": scan, "dest": dest, "threads": threads}

    def _score_pieces(self, pieces: list[Piece], scan: dict, dest: str, progress: Progress | None = None) -> Scores:
        """Score ``pieces`` batch by batch, write their predictions as one Parquet file at ``dest``."""
        t0 = time.perf_counter()
        s = self.schema
        order = sorted(self.slot, key=self.slot.get)
        version_of = pa.array([self.versions[d] for d in order] + [""], pa.string())  # slot -1: the last
        backbone_of = pa.array([self.backbone_of[d] for d in order] + [self.info.version], pa.string())
        batches, writer = [], None
        with local_file(dest) as path:
            try:
                for piece in pieces:
                    for rb in read_piece(piece, scan):
                        if not rb.num_rows:
                            continue
                        table = pa.Table.from_batches([rb])
                        try:
                            probs, slots = self.score(table)
                        except ValueError as e:  # a bad value in the rows: name the file it came from
                            if piece.path in str(e):
                                raise
                            raise LogValidationError(f"{piece.path}: {e}") from e
                        dom = pc.cast(table.column(s.domain.column), pa.string()).combine_chunks()
                        label = table.column(s.label).combine_chunks() if s.label in table.column_names else None
                        batches.append((dom, probs, label))
                        at = pa.array(np.where(slots < 0, len(order), slots))
                        out = pa.table({"domain": dom} | ({s.label: label} if label is not None else {})
                                       | {"prob": probs, "adapter_version": version_of.take(at),
                                          "backbone_version": backbone_of.take(at)})
                        writer = writer or pq.ParquetWriter(path, out.schema)
                        writer.write_table(out)
                        if progress:
                            progress.add(rb.num_rows)
            finally:
                if writer:
                    writer.close()
                if progress:
                    progress.close()
        return Scores.of_batches(batches).finish(time.perf_counter() - t0)

    def _summary(self, scores: Scores, labelled: bool, out: str) -> dict:
        names = scores.names
        rows = np.bincount(scores.codes, minlength=len(names))
        summary = {"rows": scores.rows, "out": out, "backbone": self.info.version,
                   "fallback_rows": int(sum(r for n, r in zip(names, rows, strict=True) if n not in self.versions)),
                   "domains": {n: {"rows": int(rows[i]), "adapter_version": self.versions.get(n),
                                   "backbone_version": self.backbone_of.get(n, self.info.version)}
                               for i, n in enumerate(names)}}
        if labelled:
            m = DomainMetrics(names)
            m.update(torch.from_numpy(scores.prob), torch.from_numpy(scores.label.astype(np.float32)),
                     torch.from_numpy(scores.codes.astype(np.int64)))
            metrics = m.compute(gather=False)
            for n in names:
                summary["domains"][n] |= {k: metrics["domains"][n][k] for k in SCORES}
            summary |= {k: metrics[k] for k in (*SCORES, "wauc")} | {"table": format_table(metrics)}
        return summary


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch intra-op threads ``n`` inside the block (as in a task): on a shared host, more threads
    than free cores stall every op on its slowest thread (1M rows took 234 s at 2 threads, a
    task at 1 thread scored 500k in 15-20 s, 2 cores at load 17)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score_task(spec: dict) -> Scores:
    """A Ray task: load the pinned backbone and bundles ``spec`` names, score its pieces into its part."""
    t0 = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    scorer = Scorer(spec["root"], spec["model"], spec["backbone"], spec["bundles"])
    return scorer._score_pieces(spec["pieces"], spec["scan"], spec["dest"]).finish(time.perf_counter() - t0)


def parse_bundles(spec: str) -> dict[str, str] | None:
    """``"books=v0003,films=production"`` -> ``{"books": "v0003", "films": "production"}``; '' -> None."""
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        domain, sep, ref = item.partition("=")
        if not sep or not domain.strip() or not ref.strip():
            raise ValueError(f"--bundles: expected domain=version items, got {item!r}")
        out[domain.strip()] = ref.strip()
    return out


def score(cfg: AdaptConfig, data: str, out: str, bundles: dict[str, str] | None = None) -> dict:
    """``mdlora score``: score ``data`` into ``out`` with a :class:`Scorer` of ``cfg.output``
    (``root``, ``model``, ``backbone``), tracked as one MLflow run of ``cfg.tracking``.

    Returns:
        :meth:`Scorer.score_dataset`'s summary.
    """
    name = f"score-{cfg.output.model}-{int(time.time())}-{uuid.uuid4().hex[:8]}"
    with tracking.track(cfg.tracking, cfg.output, job="score", name=name) as tracker:
        tracker.params({"output": to_dict(cfg.output), "data": data, "out": out, "bundles": bundles or "production"})
        scorer = Scorer(cfg.output.root, cfg.output.model, cfg.output.backbone, bundles)
        summary = scorer.score_dataset(data, out, cfg.score, cfg.dist.address)
        tracker.tags({"mdlora.backbone_version": scorer.info.version, "mdlora.backbone_hash": scorer.info.content_hash}
                     | {f"mdlora.adapter.{d}.version": v for d, v in scorer.versions.items()})
        tracker.metrics({k: summary.get(k) for k in ("rows", "fallback_rows", *SCORES, "wauc")}
                        | tracking.per_domain("score", summary["domains"]))
    return summary
