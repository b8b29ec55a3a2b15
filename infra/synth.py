"""Synthetic multi-domain CTR logs with a known click model: the data every test and demo uses.

The world (fixed by ``seed``; d = 8 latent dims, K domains, C = 32 categories, E = 8 devices)::

    user u   latent p_u ~ N(0, d^-1/2 I_d), gender g_u in {F, M}, city, preferred category m_u
    item i   latent q_i ~ N(0, d^-1/2 I_d), category c_i, bias b_i ~ N(0, .4^2), price_i
    domain k share w_k (one ~45 %, the rest geometric down to ~1 %), shift strength s_k
             (a permutation of linspace(.2, 1.2, K)), bias delta_k ~ N(0, .5^2),
             P_k, Q_k in R^{d x 2} scaled so that P_k^T p_u and Q_k^T q_i have unit-variance
             components, P(gender = F | k) ~ U(.2, .8)
    global   b_cat ~ N(0, .4^2) [C], b_dev ~ N(0, .2^2) [E], eta ~ N(0, .4^2) [2, K],
             zeta ~ N(0, .3^2) [2, C]

A row (one impression) draws: domain k (exact totals per domain, spread over chunks by a
multivariate hypergeometric draw); gender g ~ P(. | k); user u ~ Zipf(1.05) among the users of
gender g (ranks mapped to ids by a seeded permutation); item i ~ Zipf(1.05); device
e ~ U{0..E-1}; position t ~ U{1..10}; 0-5 recent categories (each m_u with probability .6, else
uniform); day ~ U{0..D-1}; split train/val/test ~ (.8, .1, .1).

Click model, sigma the logistic function::

    logit = beta0 + .7 p_u . q_i + b_i + b_cat[c_i] + .8 [c_i = m_u]
            - .3 (log price_i - 3) - .12 (t - 1) + b_dev[e]                 shared part
          + delta_k + s_k / sqrt(2) * (P_k^T p_u) . (Q_k^T q_i)             domain part (rank 2)
          + eta[g, k] + zeta[g, c_i]                                        auxiliary part
    click ~ Bernoulli(sigma(logit))

The rank-2 domain term has standard deviation ~ s_k, so a shared model can only fit the average
interaction ``p_u^T (.7 I + mean_k s_k P_k Q_k^T / sqrt 2) q_i`` and strongly shifted domains gain
from a per-domain low-rank adapter. ``beta0`` is solved by bisection on a pilot sample so that the
overall CTR is ``ctr``; truth.json records the oracle AUC of sigma(logit) (the ceiling a model can
reach) overall and per domain, and the oracle AUC without the domain/aux terms.

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
from scipy.special import expit

from mdlora.embeddings.schema import Schema
from mdlora.infra.storage import is_s3, open_fs
from mdlora.atomic import staging_dir
from mdlora.config import to_dict

LATENT, CATEGORIES, DEVICES, CITIES, POSITIONS, MAX_HIST = 8, 32, 8, 500, 10, 5
ZIPF, CHUNK = 1.05, 1 << 20  # popularity exponent; rows generated per chunk (bounds memory)
SPLITS = ("train", "val", "test")
_CITY = pa.array([f"city{j:03d}" for j in range(CITIES)])
_GENDER = pa.array(["F", "M"])


def domain_shares(k: int) -> np.ndarray:
    """Row shares of K domains: d00 ~45 %, the others geometric down to ~1 % (float64 [K])."""
    if k == 1:
        return np.ones(1)
    j = np.arange(k - 1)
    lo, hi = 1e-6, 1.0  # bisection on the ratio r so that 0.55 * r^(K-2) / sum(r^j) = 0.01
    for _ in range(100):
        r = (lo + hi) / 2
        w = r**j / (r**j).sum() * 0.55
        lo, hi = (r, hi) if w[-1] < 0.01 else (lo, r)
    return np.concatenate([[0.45], w])


@dataclass
class World:
    """The seeded tables of the click model (see module docstring for the math).

    Attributes: ``user_lat`` f32 [U, d], ``user_city`` i64 [U], ``user_pref`` i64 [U],
    ``user_pools`` (user ids of each gender, F then M, in popularity order); ``item_lat`` f32
    [I, d], ``item_cat`` i64 [I], ``item_bias`` f32 [I], ``item_logprice`` f32 [I]; ``cat_bias``
    [C], ``dev_bias`` [E]; per domain ``shares``, ``strength``, ``bias``, ``p_female`` [K];
    ``user_proj`` f32 [U, K, 2] = P_k^T p_u,
    ``item_proj`` f32 [I, K, 2] = Q_k^T q_i; ``eta`` [2, K]; ``zeta`` [2, C]; ``beta0``;
    ``item_by_rank`` (item ids in popularity order).
    """

    user_lat: np.ndarray
    user_city: np.ndarray
    user_pref: np.ndarray
    item_lat: np.ndarray
    item_cat: np.ndarray
    item_bias: np.ndarray
    item_logprice: np.ndarray
    cat_bias: np.ndarray
    dev_bias: np.ndarray
    shares: np.ndarray
    strength: np.ndarray
    bias: np.ndarray
    p_female: np.ndarray
    user_proj: np.ndarray
    item_proj: np.ndarray
    eta: np.ndarray
    zeta: np.ndarray
    user_pools: tuple[np.ndarray, np.ndarray]
    item_by_rank: np.ndarray
    beta0: float = 0.0


def make_world(seed: int, *, domains: int, users: int, items: int, ctr: float = 0.3) -> World:
    """The seeded world (stream 0 of ``seed``) for K ``domains``, user ids ``[0, users)``, item
    ids ``[0, items)``, with ``beta0`` bisected on a 200k-row pilot so the mean CTR is ``ctr``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    sd = LATENT**-0.25  # p_u . q_i then has unit variance
    f32 = np.float32
    user_lat = rng.normal(0, sd, (users, LATENT)).astype(f32)
    item_lat = rng.normal(0, sd, (items, LATENT)).astype(f32)
    proj_sd = (LATENT * sd**2) ** -0.5  # P_k^T p_u has unit-variance components
    pk = rng.normal(0, proj_sd, (domains, LATENT, 2)).astype(f32)
    qk = rng.normal(0, proj_sd, (domains, LATENT, 2)).astype(f32)
    gender = (rng.random(users) >= 0.45).astype(np.int64)
    by_rank = rng.permutation(users)  # popularity rank -> user id
    gender[by_rank[:2]] = [0, 1]  # both genders always have users
    pools = tuple(by_rank[gender[by_rank] == g] for g in (0, 1))
    world = World(
        user_lat=user_lat, user_pref=rng.integers(0, CATEGORIES, users),
        user_city=np.minimum(rng.zipf(1.3, users) - 1, CITIES - 1).astype(np.int64),
        item_lat=item_lat, item_by_rank=rng.permutation(items),
        item_cat=np.minimum(rng.geometric(0.12, items) - 1, CATEGORIES - 1).astype(np.int64),
        item_bias=rng.normal(0, 0.4, items).astype(f32),
        item_logprice=rng.normal(3.0, 1.0, items).astype(f32),
        cat_bias=rng.normal(0, 0.4, CATEGORIES).astype(f32),
        dev_bias=rng.normal(0, 0.2, DEVICES).astype(f32),
        shares=domain_shares(domains), strength=rng.permutation(np.linspace(0.2, 1.2, domains)),
        bias=rng.normal(0, 0.5, domains), p_female=rng.uniform(0.2, 0.8, domains),
        user_proj=np.einsum("ud,kdr->ukr", user_lat, pk),  # [U, K, 2]
        item_proj=np.einsum("id,kdr->ikr", item_lat, qk),  # [I, K, 2]
        eta=rng.normal(0, 0.4, (2, domains)), zeta=rng.normal(0, 0.3, (2, CATEGORIES)),
        user_pools=pools,
    )
    pilot_rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    pilot = draw_rows(world, pilot_rng, pilot_rng.choice(domains, 200_000, p=world.shares))
    lo, hi = -15.0, 15.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expit(pilot["logit"] + mid).mean() < ctr else (lo, mid)
    world.beta0 = (lo + hi) / 2
    return world


def _zipf(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Popularity ranks in [0, size) with P(rank r) ~ (r + 1)^-ZIPF (inverse CDF of the
    continuous power law on [1, size + 1), floored): int64 [n]."""
    top = (size + 1.0) ** (1 - ZIPF) - 1
    x = (1 + rng.random(n) * top) ** (1 / (1 - ZIPF))
    return np.minimum(x.astype(np.int64) - 1, size - 1)


def draw_rows(world: World, rng: np.random.Generator, dom: np.ndarray) -> dict[str, np.ndarray]:
    """Draw one impression per entry of ``dom`` (domain ids, int64 [n]).

    Returns:
        numpy columns ``user_id item_id category device position gender dom hist_len split
        logit logit_shared click`` ([n] each) and ``hist_vals`` ([sum hist_len]).
    """
    n, k = len(dom), len(world.shares)
    gender = (rng.random(n) >= world.p_female[dom]).astype(np.int64)
    user = np.empty(n, dtype=np.int64)
    for g, pool in enumerate(world.user_pools):
        m = gender == g
        user[m] = pool[_zipf(rng, int(m.sum()), len(pool))]
    item = world.item_by_rank[_zipf(rng, n, len(world.item_by_rank))]
    device = rng.integers(0, DEVICES, n)
    position = rng.integers(1, POSITIONS + 1, n)
    hist_len = rng.integers(0, MAX_HIST + 1, n)
    pref = np.take(world.user_pref, user)
    hist_pref = np.repeat(pref, hist_len)
    hist_vals = np.where(rng.random(len(hist_pref)) < 0.6, hist_pref,
                         rng.integers(0, CATEGORIES, len(hist_pref)))
    cat = np.take(world.item_cat, item)
    u_lat = np.take(world.user_lat, user, axis=0)  # [n, d]
    i_lat = np.take(world.item_lat, item, axis=0)  # [n, d]
    shared = (0.7 * np.einsum("nd,nd->n", u_lat, i_lat) + np.take(world.item_bias, item)
              + np.take(world.cat_bias, cat) + 0.8 * (cat == pref)
              - 0.3 * (np.take(world.item_logprice, item) - 3.0) - 0.12 * (position - 1)
              + np.take(world.dev_bias, device))
    up, iq = world.user_proj.reshape(-1), world.item_proj.reshape(-1)  # [U*K*2], [I*K*2]
    ui, ii = (user * k + dom) * 2, (item * k + dom) * 2
    shift = np.take(up, ui) * np.take(iq, ii) + np.take(up, ui + 1) * np.take(iq, ii + 1)
    logit = (shared + world.bias[dom] + world.strength[dom] / np.sqrt(2) * shift  # domain part
             + world.eta[gender, dom] + world.zeta[gender, cat] + world.beta0)  # aux part
    click = (rng.random(n) < expit(logit)).astype(np.int8)
    split = np.digitize(rng.random(n), [0.8, 0.9])  # 0 train, 1 val, 2 test
    return dict(user_id=user, item_id=item, category=cat, device=device, position=position,
                gender=gender, dom=dom, hist_len=hist_len, hist_vals=hist_vals, split=split,
                logit=logit, logit_shared=shared + world.beta0, click=click)


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

    def __post_init__(self) -> None:
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

    every = np.ones(len(dom), bool)
    domains = {}
    for i, nm in enumerate(names):
        m = dom == i
        domains[nm] = {
            "rows": int(counts[i]), "share": float(world.shares[i]),
            "rows_per_split": dict(zip(SPLITS, map(int, n_split[i]), strict=True)),
            "ctr": float(clicks[i] / counts[i]), "heldout": i >= k - cfg.holdout_domains,
            "shift_strength": float(world.strength[i]), "bias": float(world.bias[i]),
            "p_female": float(world.p_female[i]),
            "oracle_auc": auc(m, c["logit"]), "oracle_auc_shared_only": auc(m, c["logit_shared"]),
        }
    params = {**to_dict(cfg), "zipf": ZIPF, "latent_dim": LATENT, "categories": CATEGORIES}
    return {"seed": cfg.seed, "params": params, "beta0": world.beta0, "domains": domains,
            "ctr": float(clicks.sum() / counts.sum()), "oracle_auc": auc(every, c["logit"], w),
            "oracle_auc_shared_only": auc(every, c["logit_shared"], w)}


def generate(out: str, *, rows: int, domains: int, seed: int, holdout_domains: int = 0,
             days: int = 7, users: int = 100_000, items: int = 100_000, ctr: float = 0.3,
             start: str = "2026-01-01") -> dict:
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

    Returns:
        Summary: rows, ctr, generation / write seconds and rows/s, rows per domain, seconds.

    Raises:
        ValueError: a bad argument (named).
        FileExistsError: ``out`` exists and is not an empty directory.
    """
    cfg = SynthConfig(rows=rows, domains=domains, seed=seed, holdout_domains=holdout_domains,
                      days=days, users=users, items=items, ctr=ctr, start=start)
    fs, path = open_fs(out)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise FileExistsError(f"{out}: output already exists and is not an empty directory")
    t0 = time.perf_counter()
    world = make_world(seed, domains=domains, users=users, items=items, ctr=ctr)
    if is_s3(out):
        summary = _write_all(fs, path, False, cfg, world)
    else:
        if Path(path).is_dir():
            Path(path).rmdir()  # empty (checked above); staging_dir creates it anew
        with staging_dir(path) as tmp:
            summary = _write_all(fs, str(tmp), True, cfg, world)
    return {**summary, "out": out, "seconds": time.perf_counter() - t0}
