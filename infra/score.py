"""Scoring: one process, the unsharded backbone plus every domain's production adapter, per-row routing.

Python API::

    scorer = Scorer("registry", "ctr")                    # production backbone + production bundles
    probs = scorer.score_table(arrow_table)               # float32 [N], rows in input order
    summary = scorer.score_dataset("logs/test", "preds.parquet")

Loading refuses (``BundleError``) a bundle trained on another backbone (content hash) or schema
(schema hash), or one that is tampered with. Each row goes to its domain's adapter in one batched
pass; rows of a domain without a bundle (or unknown to the schema) get the plain backbone and are
counted as fallback rows. The backbone is read from its DCP shards into a world-1 model
(``trainer.recipes.load_unsharded``: the tables whole, in this process).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from adapters.bundle import BundleError, load_bundle
from adapters.config import LoraConfig
from adapters.inject import inject
from adapters.registry import Registry
from embeddings.batch import BatchConverter
from infra.adapt import SHARED, open_backbone
from infra.storage import is_s3, open_fs
from mdlora.atomic import write_bytes
from mdlora.config import from_dict
from trainer.metrics import DomainMetrics, format_table
from trainer.recipes import load_unsharded

ROWS = 65536


class Scorer:
    """A backbone version with per-domain adapters, ready to score mixed-domain rows.

    Args:
        root: registry root (local dir or s3://).
        model: backbone name.
        backbone_ref: backbone alias or version.
        bundles: ``{domain: version or alias}`` to load; None: the production bundle of every
            domain that has one.
        cache_dir: where S3 artefacts are downloaded (a temp dir when None).

    Raises:
        BundleError: a bundle does not match the backbone or schema, or is corrupt.
        ValueError: bundles disagree on their LoRA config (one model serves them all).
    """

    def __init__(self, root: str, model: str, backbone_ref: str = "production",
                 bundles: dict[str, str] | None = None, cache_dir: str | Path | None = None) -> None:
        cache = Path(cache_dir or tempfile.mkdtemp(prefix="mdlora-score-"))
        self.info = info = open_backbone(root, model, backbone_ref, cache)
        registry = Registry(*open_fs(root))
        if bundles is None:
            bundles = {d: "production" for d in registry.names("adapters")
                       if "production" in registry.aliases("adapters", d)}
        loaded = {}
        for domain, ref in sorted(bundles.items()):
            path = registry.fetch("adapters", domain, ref, cache)
            loaded[domain] = load_bundle(path, expect_backbone_hash=info.content_hash,
                                         expect_schema_hash=info.schema.content_hash())
        self.schema = info.schema.with_domains(sorted(loaded))
        self.backbone = load_unsharded(info.path, self.schema, info.run.model).backbone
        self.versions = {d: m.version for d, (_, m) in loaded.items()}
        self.adapted, self.aux_col = None, None
        if loaded:
            self._inject(loaded)
        self.slot = {d: i for i, d in enumerate(loaded)}

    def _inject(self, loaded: dict) -> None:
        configs = {d: m.lora for d, (_, m) in loaded.items()}
        first = next(iter(configs.values()))
        if any(c != first for c in configs.values()):
            raise ValueError(f"bundles: LoRA configs differ across domains {configs}; score them separately")
        lora = from_dict(LoraConfig, first)
        aux_values = None
        if lora.method == "multilora":
            self.aux_col = [a.name for a in self.schema.aux].index(lora.aux)
            aux_values = self.schema.aux[self.aux_col].values
        self.adapted = inject(self.backbone, lora, list(loaded), aux_values, root="tower")
        shared = None
        for d, (tensors, _) in loaded.items():
            own = {k[len(SHARED):]: v for k, v in tensors.items() if k.startswith(SHARED)}
            if shared is not None and any(not torch.equal(shared[k], own[k]) for k in shared):
                raise BundleError(f"adapters/{d} {self.versions[d]}: its shared aux LoRA differs from the other "
                                  "domains' bundles (trained in another adapt run); score them separately")
            shared = own
            self.adapted.load_state_for(d, {k: v for k, v in tensors.items() if not k.startswith(SHARED)})
        if lora.method == "multilora":
            self.adapted.load_shared_state(shared)

    @torch.no_grad()
    def score(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities float32 [N] and adapter slots int64 [N] (-1: backbone only) of ``table``."""
        s = self.schema
        domains = pc.cast(table.column(s.domain.column), pa.string())
        names = [str(v) for v in pc.unique(domains).to_pylist()]
        slots_of = np.array([self.slot.get(n, -1) for n in names] + [-1], dtype=np.int64)
        slots = slots_of[pc.fill_null(pc.index_in(domains, pa.array(names, pa.string())), len(names)).to_numpy()]
        if s.label not in table.column_names:
            table = table.append_column(s.label, pa.array(np.zeros(table.num_rows, np.int8)))
        conv = BatchConverter(s.with_domains(names))
        probs = np.zeros(table.num_rows, np.float32)
        for lo in range(0, table.num_rows, ROWS):
            batch = conv.convert(table.slice(lo, ROWS).combine_chunks())
            sl = torch.from_numpy(slots[lo:lo + ROWS])
            if self.adapted is None:
                logits = self.backbone(batch.sparse, batch.dense)
            else:
                aux = None if self.aux_col is None else batch.aux[:, self.aux_col]
                with self.adapted.routing(sl, aux):
                    logits = self.backbone(batch.sparse, batch.dense)
            probs[lo:lo + len(batch)] = torch.sigmoid(logits).numpy()
        return probs, slots

    def score_table(self, table: pa.Table) -> np.ndarray:
        """Click probabilities float32 [N] of ``table``'s rows, in order."""
        return self.score(table)[0]

    def score_dataset(self, data: str, out: str) -> dict:
        """Score a Parquet dataset (file or dir, local or s3://) and write predictions atomically.

        The output Parquet holds, in input order (files by path, then row order): ``domain``,
        the label column when present, ``prob`` and ``adapter_version`` ('' on fallback rows).

        Returns:
            ``{"rows", "fallback_rows", "domains": {name: {"rows", "adapter_version", "auc", "logloss"}},
            "auc", "out"}`` (AUCs only when labels exist).
        """
        fs, path = open_fs(data)
        if not fs.exists(path):
            raise FileNotFoundError(f"{data}: no such dataset")
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        s = self.schema
        cols = [c for c in s.columns() if c in dataset.schema.names]
        labelled = s.label in cols
        version_of = np.array([self.versions[d] for d in self.slot] + [""], dtype=object)
        parts = []
        for rb in dataset.to_batches(columns=cols, batch_size=ROWS):
            table = pa.Table.from_batches([rb])
            if not table.num_rows:
                continue
            probs, slots = self.score(table)
            dom = pc.cast(table.column(s.domain.column), pa.string())
            cols_out = {"domain": dom} | ({s.label: table.column(s.label)} if labelled else {})
            parts.append(pa.table(cols_out | {"prob": probs, "adapter_version": version_of[slots].tolist()}))
        if not parts:
            raise ValueError(f"{data}: no rows to score")
        result = pa.concat_tables(parts)
        _write_parquet(result, out)
        return self._summary(result, labelled, out)

    def _summary(self, result: pa.Table, labelled: bool, out: str) -> dict:
        dom = result.column("domain").to_numpy(zero_copy_only=False)
        names = sorted(set(dom.tolist()))
        summary = {"rows": result.num_rows, "out": out, "backbone": self.info.version,
                   "fallback_rows": int(sum(1 for v in result.column("adapter_version").to_pylist() if not v)),
                   "domains": {n: {"rows": int((dom == n).sum()), "adapter_version": self.versions.get(n)}
                               for n in names}}
        if labelled:
            m = DomainMetrics(names)
            ids = np.searchsorted(np.array(names), dom)
            m.update(torch.from_numpy(result.column("prob").to_numpy()),
                     torch.from_numpy(result.column(self.schema.label).to_numpy().astype(np.float32)),
                     torch.from_numpy(ids))
            metrics = m.compute(gather=False)
            for n in names:
                summary["domains"][n] |= {k: metrics["domains"][n][k] for k in ("auc", "logloss")}
            summary |= {"auc": metrics["auc"], "wauc": metrics["wauc"], "table": format_table(metrics)}
        return summary


def _write_parquet(table: pa.Table, out: str) -> None:
    """Write ``table`` to ``out`` (local: temp + rename; S3: one PUT) so readers never see half."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    if is_s3(out):
        fs, path = open_fs(out)
        fs.pipe_file(path, data)
    else:
        write_bytes(out, data)


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
