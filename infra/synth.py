"""Synthetic multi-domain CTR logs with a known click model: the data every test and demo uses.

:mod:`mdlora.infra.synth_world` holds the world and the click model (its docstring has the math
and the shift families a-e); this module draws the rows chunk by chunk and writes them. The
domain of each row comes from exact totals per domain (10 + the largest remainders of
``w_k * (N - 10 K)``), spread over chunks by a multivariate hypergeometric draw; each row also
gets a day ~ U{0..D-1}.

truth.json records the realised sizes and CTRs, the families that are on (``shifts``) with their
scales (``shift_scales``) and per-domain parameters (``domains.<d>.shift``), and, on a pilot of
20k rows per domain (reweighted to the domain mix for the overall figures): ``oracle_auc``, the
AUC of sigma(logit), the ceiling a model can reach; ``oracle_auc_shared_only``, that of the
shared part alone; ``auc_lost.<f>``, the oracle AUC lost when family f's term is dropped from
the logit (``all``: every family's), the headroom a shared model leaves to a per-domain one; and
``term_sd.<f>``, the standard deviation of family f's term.

Output (``OUT`` a local dir, committed atomically, or ``s3://``, schema.yaml written last)::

    OUT/schema.yaml  OUT/truth.json
    OUT/{train,val,test}/date=YYYY-MM-DD/part-00000.parquet
    OUT/heldout/<domain>/{train,val,test}/date=YYYY-MM-DD/part-00000.parquet   (last H domains)
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdlora.atomic import staging_dir
from mdlora.config import to_dict
from mdlora.embeddings.schema import Schema
from mdlora.infra.storage import is_s3, open_fs
from mdlora.infra.synth_world import (
    CATEGORIES,
    CITIES,
    LATENT,
    MAX_HIST,
    ZIPF,
    World,
    draw_rows,
    make_world,
    parse_shifts,
)

CHUNK = 1 << 20  # rows generated per chunk (bounds memory)
SPLITS = ("train", "val", "test")
_CITY = pa.array([f"city{j:03d}" for j in range(CITIES)])
_GENDER = pa.array(["F", "M"])


def _to_table(cols: dict[str, np.ndarray], world: World, names: pa.Array) -> pa.Table:
    """Arrow table of one chunk (list column ``hist_cats``, string ``city/gender/domain``)."""
    offsets = np.zeros(len(cols["hist_len"]) + 1, dtype=np.int32)
    np.cumsum(cols["hist_len"], out=offsets[1:])
    user = cols["user_id"]
    return pa.table({
        "user_id": user, "item_id": cols["item_id"], "category": cols["category"],
        "hist_cats": pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols["hist_vals"])),
        "city": _CITY.take(pa.array(np.take(world.user_city, user))), "device": cols["device"],
        "price": np.exp(np.take(world.item_logprice, cols["item_id"])),
        "position": cols["position"].astype(np.float32),
        "gender": _GENDER.take(pa.array(cols["gender"])),
        "domain": names.take(pa.array(cols["dom"])), "click": cols["click"],
    })


def make_schema(names: list[str], *, users: int, items: int, dim: int = 16) -> Schema:
    """The schema of a generated log whose domain vocabulary is ``names``."""
    tables = {"user": users, "item": items, "category": CATEGORIES, "city": 1024, "device": 64}
    sparse = [("user_id", "user", "index"), ("item_id", "item", "index"),
              ("category", "category", "index"), ("city", "city", "hash"),
              ("device", "device", "hash")]
    return Schema.from_dict({
        "name": "synthetic", "label": "click", "date_column": "date",
        "domain": {"column": "domain", "values": names},
        "aux": [{"name": "gender", "column": "gender", "values": ["F", "M"]}],
        "tables": [{"name": t, "num_embeddings": n, "dim": dim} for t, n in tables.items()],
        "sparse": [{"name": f, "table": t, "policy": p} for f, t, p in sparse]
        + [{"name": "hist_cats", "table": "category", "multi": True, "max_len": MAX_HIST}],
        "dense": [{"name": "price", "norm": "log"},
                  {"name": "position", "norm": "standard", "mean": 5.5, "std": 2.87}],
    })


@dataclass(kw_only=True)
class SynthConfig:
    """Arguments of :func:`generate` (recorded in truth.json as ``params``)."""

    rows: int
    """Total rows N over all domains (held-out ones included), >= 10 K."""
    domains: int
    """K >= 1 domains, named ``d00, d01, ...``."""
    seed: int
    """Master seed; the same config gives byte-identical files."""
    holdout_domains: int = 0
    """The last H domains go under ``heldout/`` only and are left out of the schema."""
    days: int = 7
    """Log days, one hive partition ``date=YYYY-MM-DD`` each, from ``start``."""
    users: int = 100_000
    """User ids ``[0, users)`` (index policy), >= 2."""
    items: int = 100_000
    """Item ids ``[0, items)`` (index policy)."""
    ctr: float = 0.3
    """Target overall click rate."""
    start: str = "2026-01-01"
    """First log date."""
    shifts: tuple[str, ...] = ("a",)
    """Shift families on (letters of ``abcde``, synth_world docstring), or ``"a,b,..."``;
    ``("a",)`` alone gives the data of the generator before the families b-e, byte for byte."""

    def __post_init__(self) -> None:
        self.shifts = parse_shifts(self.shifts)  # ValueError names the bad value
        k = self.domains
        for flag, ok, want in (
            ("--domains", k >= 1, ">= 1"),
            ("--rows", self.rows >= 10 * k, f">= 10 * domains = {10 * k}"),
            ("--holdout-domains", 0 <= self.holdout_domains < k, f"in [0, domains={k})"),
            ("--days", self.days >= 1, ">= 1"), ("--users", self.users >= 2, ">= 2"),
            ("--items", self.items >= 1, ">= 1"), ("ctr", 0 < self.ctr < 1, "in (0, 1)"),
        ):
            if not ok:
                value = getattr(self, flag.lstrip("-").replace("-", "_"))
                raise ValueError(f"{flag}: must be {want}, got {value}")
        dt.date.fromisoformat(self.start)  # ValueError names the bad date


def _write_all(fs, root: str, local: bool, cfg: SynthConfig, world: World) -> dict:
    """Generate chunk by chunk, appending each partition's rows to its own Parquet writer."""
    names = [f"d{i:02d}" for i in range(cfg.domains)]
    k, days, keep = cfg.domains, cfg.days, cfg.domains - cfg.holdout_domains
    extra = world.shares * (cfg.rows - 10 * k)  # exact rows per domain: 10 + largest remainder
    counts = 10 + np.floor(extra).astype(np.int64)
    counts[np.argsort(-(extra % 1), kind="stable")[: cfg.rows - counts.sum()]] += 1
    remaining, clicks, n_split = counts.copy(), np.zeros(k), np.zeros((k, 3), dtype=np.int64)
    start = dt.date.fromisoformat(cfg.start)
    groups = [""] + [f"heldout/{nm}/" for nm in names[keep:]]  # main, then each held-out domain
    dirs = [f"{g}{s}/date={start + dt.timedelta(days=d)}"
            for g in groups for s in SPLITS for d in range(days)]  # [(H + 1) * 3 * D]
    writers: dict[int, tuple] = {}
    t_gen = t_write = 0.0
    try:
        for c, lo in enumerate(range(0, cfg.rows, CHUNK)):
            t0 = time.perf_counter()
            n = min(CHUNK, cfg.rows - lo)
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, c]))
            take = rng.multivariate_hypergeometric(remaining, n, method="marginals")
            remaining -= take
            dom = rng.permutation(np.repeat(np.arange(k), take))
            cols = draw_rows(world, rng, dom)
            day = rng.integers(0, days, n)
            clicks += np.bincount(dom, weights=cols["click"], minlength=k)
            n_split += np.bincount(dom * 3 + cols["split"], minlength=3 * k).reshape(k, 3)
            group = np.maximum(dom - keep + 1, 0)  # 0 main, g >= 1 held-out domain keep + g - 1
            key = (group * 3 + cols["split"]) * days + day  # index into dirs
            order = np.argsort(key, kind="stable")
            bounds = np.searchsorted(key[order], np.arange(len(dirs) + 1))
            table = _to_table(cols, world, pa.array(names)).take(pa.array(order))
            t1 = time.perf_counter()
            for j in np.flatnonzero(np.diff(bounds)):
                if j not in writers:
                    path = f"{root}/{dirs[j]}/part-00000.parquet"
                    if local:
                        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                    f = fs.open(path, "wb", block_size=8 << 20)
                    writers[j] = (f, pq.ParquetWriter(f, table.schema))
                writers[j][1].write_table(table.slice(bounds[j], bounds[j + 1] - bounds[j]))
            t_gen, t_write = t_gen + t1 - t0, t_write + time.perf_counter() - t1
    finally:
        for f, w in writers.values():
            w.close()
            f.close()
    truth = _truth(world, names, counts, clicks, n_split, cfg)
    with fs.open(f"{root}/truth.json", "w") as f:
        f.write(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    with fs.open(f"{root}/schema.yaml", "w") as f:  # last: its presence marks a complete log
        f.write(make_schema(names[:keep], users=cfg.users, items=cfg.items).dump())
    return {"rows": cfg.rows, "ctr": truth["ctr"], "gen_seconds": t_gen, "write_seconds": t_write,
            "gen_rows_per_s": cfg.rows / max(t_gen, 1e-9),
            "domains": {nm: int(c) for nm, c in zip(names, counts, strict=True)}}


def _truth(world: World, names: list[str], counts, clicks, n_split, cfg: SynthConfig) -> dict:
    """truth.json: realised sizes/CTRs, the world's domain parameters, oracle AUCs on a pilot."""
    from sklearn.metrics import roc_auc_score

    k = len(names)
    dom = np.repeat(np.arange(k), 20_000)
    c = draw_rows(world, np.random.default_rng(np.random.SeedSequence([cfg.seed, 3])), dom)
    y, w = c["click"], world.shares[dom] / 20_000  # pilot reweighted to the real domain mix

    def auc(m: np.ndarray, logit: np.ndarray, weight=None) -> float | None:
        sw = None if weight is None else weight[m]
        both = 0 < y[m].sum() < m.sum()  # AUC needs both classes
        return float(roc_auc_score(y[m], logit[m], sample_weight=sw)) if both else None

    def oracle(m: np.ndarray, weight=None) -> dict:
        """Oracle AUCs of the rows ``m``, and what dropping each family's term loses."""
        full, terms = auc(m, c["logit"], weight), {f: c[f"term_{f}"] for f in world.shifts}
        drops = {f: c["logit"] - t for f, t in terms.items()}
        drops["all"] = c["logit"] - sum(terms.values(), np.zeros(len(dom)))
        lost = {f: None if full is None else full - auc(m, d, weight) for f, d in drops.items()}
        return {"oracle_auc": full, "oracle_auc_shared_only": auc(m, c["logit_shared"], weight),
                "auc_lost": lost if terms else {}}

    a_on = "a" in world.shifts
    domains = {}
    for i, nm in enumerate(names):
        m = dom == i
        domains[nm] = {
            "rows": int(counts[i]), "share": float(world.shares[i]),
            "rows_per_split": dict(zip(SPLITS, map(int, n_split[i]), strict=True)),
            "ctr": float(clicks[i] / counts[i]), "heldout": i >= k - cfg.holdout_domains,
            "shift_strength": float(world.strength[i]) if a_on else 0.0,
            "bias": float(world.bias[i]), "p_female": float(world.p_female[i]), **oracle(m),
            "term_sd": {f: float(c[f"term_{f}"][m].std()) for f in world.shifts},
            "shift": _domain_shift(world, i),
        }
    params = {**to_dict(cfg), "zipf": ZIPF, "latent_dim": LATENT, "categories": CATEGORIES}
    return {"seed": cfg.seed, "params": params, "beta0": world.beta0, "domains": domains,
            "ctr": float(clicks.sum() / counts.sum()), "shifts": list(world.shifts),
            "shift_scales": {f: world.scales.of(f) for f in world.shifts},
            **oracle(np.ones(len(dom), bool), w)}


def _domain_shift(world: World, i: int) -> dict:
    """Domain ``i``'s parameters of each family that is on (keys as in the docstring)."""
    fam, out = world.fam, {}
    if "a" in world.shifts:
        out["a"] = {"strength": float(world.strength[i])}
    if fam.cat_bias is not None:
        n_items = len(world.item_by_rank)
        mine = fam.item_keys // n_items == i
        out["b"] = {"category_bias": [round(float(v), 4) for v in fam.cat_bias[i]],
                    "items_with_bias": int(mine.sum()),
                    "item_bias_sd": float(fam.item_vals[mine].std())}
    if fam.price_slope is not None:
        out["c"] = {"price_slope": float(fam.price_slope[i])}
    if fam.city_on is not None:
        out["d"] = {"feature": "city", "matters": bool(fam.city_on[i])}
    if fam.hot_items is not None:
        hot = fam.hot_items[i]
        effect = fam.hot_vals[np.searchsorted(fam.hot_keys, i * len(world.item_by_rank) + hot)]
        out["e"] = {"hot_items": hot.tolist(), "hot_effect": [round(float(v), 4) for v in effect]}
    return out


def generate(out: str, *, rows: int, domains: int, seed: int, holdout_domains: int = 0,
             days: int = 7, users: int = 100_000, items: int = 100_000, ctr: float = 0.3,
             start: str = "2026-01-01", shifts: str | tuple[str, ...] = ("a",)) -> dict:
    """Write a synthetic multi-domain CTR log and its schema to ``out`` (local dir or s3://).

    Args:
        out: output directory (must be absent or empty) or ``s3://bucket/prefix``.
        rows: total rows N (see :class:`SynthConfig` for every keyword argument).
        domains: K.
        seed: master seed.
        holdout_domains: H held-out domains.
        days: log days.
        users: user id range.
        items: item id range.
        ctr: target click rate.
        start: first log date.
        shifts: shift families on, e.g. ``("a", "b")`` or ``"a,b"`` (synth_world docstring).

    Returns:
        Summary: rows, ctr, generation / write seconds and rows/s, rows per domain, seconds.

    Raises:
        ValueError: a bad argument (named).
        FileExistsError: ``out`` exists and is not an empty directory.
    """
    cfg = SynthConfig(rows=rows, domains=domains, seed=seed, holdout_domains=holdout_domains,
                      days=days, users=users, items=items, ctr=ctr, start=start, shifts=shifts)
    fs, path = open_fs(out)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise FileExistsError(f"{out}: output already exists and is not an empty directory")
    t0 = time.perf_counter()
    world = make_world(seed, domains=domains, users=users, items=items, ctr=ctr,
                       shifts=cfg.shifts)
    if is_s3(out):
        summary = _write_all(fs, path, False, cfg, world)
    else:
        if Path(path).is_dir():
            Path(path).rmdir()  # empty (checked above); staging_dir creates it anew
        with staging_dir(path) as tmp:
            summary = _write_all(fs, str(tmp), True, cfg, world)
    return {**summary, "out": out, "seconds": time.perf_counter() - t0}
