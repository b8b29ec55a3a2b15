"""The world and click model of the synthetic logs (pure numpy; infra/synth.py writes them).

The world (fixed by ``seed``; d = 8 latent dims, K domains, C = 32 categories, E = 8 devices)::

    user u   latent p_u ~ N(0, d^-1/2 I_d), gender g_u in {F, M}, city_u, preferred category m_u
    item i   latent q_i ~ N(0, d^-1/2 I_d), category c_i, bias b_i ~ N(0, .4^2), price_i
    domain k share w_k (one ~45 %, the rest geometric down to ~1 %), shift strength s_k
             (a permutation of linspace(.2, 1.2, K)), bias delta_k ~ N(0, .5^2),
             P_k, Q_k in R^{d x 2} scaled so that P_k^T p_u and Q_k^T q_i have unit-variance
             components, P(gender = F | k) ~ U(.2, .8)
    global   b_cat ~ N(0, .4^2) [C], b_dev ~ N(0, .2^2) [E], eta ~ N(0, .4^2) [2, K],
             zeta ~ N(0, .3^2) [2, C]

A row (one impression) draws: domain k (given); gender g ~ P(. | k); user u ~ Zipf(1.05) among
the users of gender g (ranks mapped to ids by a seeded permutation); item i ~ Zipf(1.05); device
e ~ U{0..E-1}; position t ~ U{1..10}; 0-5 recent categories (each m_u with probability .6, else
uniform); split train/val/test ~ (.8, .1, .1). With family (e) on, a share h of domain k's rows
instead draws its item from k's own hot items: i = H_k[j], j ~ Zipf(1.05) over the H hot items.

Click model, sigma the logistic function, [f] a term present only when shift family f is on::

    logit = beta0 + .7 p_u . q_i + b_i + b_cat[c_i] + .8 [c_i = m_u]
            - .3 (log price_i - 3) - .12 (t - 1) + b_dev[e]                 shared part
          + delta_k + eta[g, k] + zeta[g, c_i]                              bias and aux part
      [a] + s_k / sqrt(2) * (P_k^T p_u) . (Q_k^T q_i)                       low-rank user x item
      [b] + cb_k[c_i] + ib_k[i]                                             ID preferences
      [c] + gamma_k (log price_i - 3)                                       price sensitivity
      [d] + o_k v[city_u]                                                   feature of some domains
      [e] + hb_k[i]                                                         own hot items
    click ~ Bernoulli(sigma(logit))

The families and their scales (:class:`Scales`, fields prefixed by the family letter):

(a) the rank-2 term has standard deviation ~ s_k, so a shared model can only fit the average
    interaction ``p_u^T (.7 I + mean_k s_k P_k Q_k^T / sqrt 2) q_i``: exactly what tower LoRA
    can express. The default; alone (``shifts=("a",)``) the rows are byte for byte those of the
    generator before the families b-e existed. delta_k and the aux part are always on.
(b) cb_k ~ N(0, .5^2) [C] per domain: each domain favours other categories; ib_k[i] ~
    N(0, .8^2) on a random 10 % of the items per domain (0 elsewhere): per-domain item tastes.
(c) gamma_k = +-U(.3, .8), signs alternating over a permuted domain order (both signs when
    K >= 2): on top of the shared -.3 some domains are price-averse, others price-seeking.
(d) v ~ N(0, 1) per city, centred and scaled to sd .6 over users (city carries no signal in
    the shared part); o_k = 1 on ceil(K / 2) domains drawn at random, else 0.
(e) H_k: H = 20 items per domain drawn uniformly (so mostly outside the global head), a share
    h = .3 of k's rows shows one of them; hb_k[H_k[j]] ~ N(.6, .6^2), 0 for other items.

Each family's parameters come from their own seed stream (``[seed, 4, j]``), so switching one
family on or off leaves the others' parameters unchanged, and b-d leave every random draw of a
row as it was (the uniform behind its click too); (e) draws last, so it changes the items of
some rows and the draws that follow (gen-logs' day). ``beta0`` is solved by bisection on a pilot
sample so that the overall CTR is ``ctr`` with the families that are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from scipy.special import expit

LATENT, CATEGORIES, DEVICES, CITIES, POSITIONS, MAX_HIST = 8, 32, 8, 500, 10, 5
ZIPF = 1.05  # popularity exponent of users, items and hot items
SHIFTS = "abcde"
"""The shift families (module docstring); ``("a",)`` is the default."""


@dataclass(frozen=True, kw_only=True)
class Scales:
    """Strengths of the shift families; truth.json records the fields of the families that are
    on (``b_category_sd`` as ``shift_scales.b.category_sd``)."""

    a_strength: tuple[float, float] = (0.2, 1.2)
    """(a) s_k is a permutation of ``linspace(lo, hi, K)``."""
    b_category_sd: float = 0.5
    """(b) sd of the per-domain category bias cb_k [C]."""
    b_item_fraction: float = 0.1
    """(b) share of the items that carry a per-domain bias in each domain."""
    b_item_sd: float = 0.8
    """(b) sd of that per-domain item bias ib_k."""
    c_price_slope: tuple[float, float] = (0.3, 0.8)
    """(c) |gamma_k| ~ U(lo, hi), signs alternating."""
    d_city_sd: float = 0.6
    """(d) sd over users of the city effect v in the domains where it matters."""
    e_hot_items: int = 20
    """(e) H hot items per domain."""
    e_hot_share: float = 0.3
    """(e) share h of a domain's rows that show one of its hot items."""
    e_hot_mean: float = 0.6
    """(e) mean of a hot item's click effect hb_k in its domain."""
    e_hot_sd: float = 0.6
    """(e) sd of that click effect."""

    def of(self, family: str) -> dict:
        """The scales of one family, prefix dropped: ``{"category_sd": .5, ...}``."""
        return {f.name[2:]: getattr(self, f.name) for f in fields(self)
                if f.name.startswith(f"{family}_")}


SCALES = Scales()


def parse_shifts(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Shift families from ``"a,b,c"`` (``"none"`` or ``""``: none) or a sequence of letters.

    Returns:
        The letters in ``SHIFTS`` order, e.g. ``("a", "c")``.

    Raises:
        ValueError: an unknown or repeated family, naming the value.
    """
    if isinstance(value, str):
        parts = [] if value.strip() in ("", "none") else [p.strip() for p in value.split(",")]
    else:
        parts = list(value)
    bad = [p for p in parts if p not in tuple(SHIFTS)]
    if bad or len(set(parts)) < len(parts):
        what = f"unknown family {bad[0]!r}" if bad else "a family repeated"
        raise ValueError(f"--shifts: {what} in {value!r} (a comma list of {', '.join(SHIFTS)}, "
                         "or none)")
    return tuple(f for f in SHIFTS if f in parts)


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
class Families:
    """Per-domain parameters of the shift families b-e (None where a family is off).

    Attributes: ``cat_bias`` [K, C] = cb_k; ``item_keys`` i64 [M] (sorted ``k * I + i``) and
    ``item_vals`` [M] = ib_k[i]; ``price_slope`` [K] = gamma_k; ``city_effect`` [CITIES] = v,
    ``city_on`` bool [K] = o_k; ``hot_items`` i64 [K, H] = H_k, ``hot_keys`` i64 [K * H]
    (sorted ``k * I + i``) and ``hot_vals`` [K * H] = hb_k[i].
    """

    cat_bias: np.ndarray | None = None
    item_keys: np.ndarray | None = None
    item_vals: np.ndarray | None = None
    price_slope: np.ndarray | None = None
    city_effect: np.ndarray | None = None
    city_on: np.ndarray | None = None
    hot_items: np.ndarray | None = None
    hot_keys: np.ndarray | None = None
    hot_vals: np.ndarray | None = None


@dataclass
class World:
    """The seeded tables of the click model (see module docstring for the math).

    Attributes: ``user_lat`` f32 [U, d], ``user_city`` i64 [U], ``user_pref`` i64 [U],
    ``user_pools`` (user ids of each gender, F then M, in popularity order); ``item_lat`` f32
    [I, d], ``item_cat`` i64 [I], ``item_bias`` f32 [I], ``item_logprice`` f32 [I]; ``cat_bias``
    [C], ``dev_bias`` [E]; per domain ``shares``, ``strength``, ``bias``, ``p_female`` [K];
    ``user_proj`` f32 [U, K, 2] = P_k^T p_u,
    ``item_proj`` f32 [I, K, 2] = Q_k^T q_i; ``eta`` [2, K]; ``zeta`` [2, C]; ``beta0``;
    ``item_by_rank`` (item ids in popularity order); ``shifts`` (the families on),
    ``scales`` and ``fam`` (their parameters).
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
    shifts: tuple[str, ...] = ("a",)
    scales: Scales = SCALES
    fam: Families = field(default_factory=Families)


def make_world(seed: int, *, domains: int, users: int, items: int, ctr: float = 0.3,
               shifts: tuple[str, ...] = ("a",), scales: Scales = SCALES) -> World:
    """The seeded world (stream 0 of ``seed``) for K ``domains``, user ids ``[0, users)``, item
    ids ``[0, items)``, with ``beta0`` bisected on a 200k-row pilot so the mean CTR is ``ctr``.
    ``shifts`` (letters of ``SHIFTS``, see :func:`parse_shifts`) picks the families."""
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
        shares=domain_shares(domains),
        strength=rng.permutation(np.linspace(*scales.a_strength, domains)),
        bias=rng.normal(0, 0.5, domains), p_female=rng.uniform(0.2, 0.8, domains),
        user_proj=np.einsum("ud,kdr->ukr", user_lat, pk),  # [U, K, 2]
        item_proj=np.einsum("id,kdr->ikr", item_lat, qk),  # [I, K, 2]
        eta=rng.normal(0, 0.4, (2, domains)), zeta=rng.normal(0, 0.3, (2, CATEGORIES)),
        user_pools=pools, shifts=tuple(shifts), scales=scales,
    )
    world.fam = _families(seed, world, domains, items)
    pilot_rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    pilot = draw_rows(world, pilot_rng, pilot_rng.choice(domains, 200_000, p=world.shares))
    lo, hi = -15.0, 15.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expit(pilot["logit"] + mid).mean() < ctr else (lo, mid)
    world.beta0 = (lo + hi) / 2
    return world


def _families(seed: int, world: World, k: int, items: int) -> Families:
    """Parameters of the families b-e that are on, each from its own stream ``[seed, 4, j]``."""
    s, on, fam = world.scales, world.shifts, Families()

    def rng(j: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([seed, 4, j]))

    if "b" in on:
        r, m = rng(1), max(1, round(s.b_item_fraction * items))
        fam.cat_bias = r.normal(0, s.b_category_sd, (k, CATEGORIES))
        ids = np.stack([np.sort(r.choice(items, m, replace=False)) for _ in range(k)])  # [K, m]
        fam.item_keys = (np.arange(k)[:, None] * items + ids).reshape(-1)
        fam.item_vals = r.normal(0, s.b_item_sd, k * m)
    if "c" in on:
        r = rng(2)
        sign = np.where(r.permutation(k) % 2 == 0, 1.0, -1.0)
        fam.price_slope = sign * r.uniform(*s.c_price_slope, k)
    if "d" in on:
        r = rng(3)
        v = r.normal(0, 1, CITIES)
        per_user = v[world.user_city]  # centred and scaled over users
        fam.city_effect = (v - per_user.mean()) * (s.d_city_sd / max(per_user.std(), 1e-9))
        fam.city_on = np.zeros(k, bool)
        fam.city_on[r.permutation(k)[: (k + 1) // 2]] = True
    if "e" in on:
        r, h = rng(4), min(s.e_hot_items, items)
        fam.hot_items = np.stack([r.choice(items, h, replace=False) for _ in range(k)])
        keys = (np.arange(k)[:, None] * items + fam.hot_items).reshape(-1)  # [K * H]
        vals = r.normal(s.e_hot_mean, s.e_hot_sd, k * h)
        order = np.argsort(keys, kind="stable")
        fam.hot_keys, fam.hot_vals = keys[order], vals[order]
    return fam


def _zipf(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Popularity ranks in [0, size) with P(rank r) ~ (r + 1)^-ZIPF (inverse CDF of the
    continuous power law on [1, size + 1), floored): int64 [n]."""
    top = (size + 1.0) ** (1 - ZIPF) - 1
    x = (1 + rng.random(n) * top) ** (1 / (1 - ZIPF))
    return np.minimum(x.astype(np.int64) - 1, size - 1)


def _lookup(keys: np.ndarray, vals: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vals[j]`` where ``keys[j] == query`` (keys sorted), else 0: float64 [n]."""
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[pos] == query, vals[pos], 0.0)


def draw_rows(world: World, rng: np.random.Generator, dom: np.ndarray) -> dict[str, np.ndarray]:
    """Draw one impression per entry of ``dom`` (domain ids, int64 [n]).

    Returns:
        numpy columns ``user_id item_id category device position gender dom hist_len split
        logit logit_shared click`` ([n] each), ``hist_vals`` ([sum hist_len]) and, per family
        f that is on, its logit term ``term_f`` ([n]).
    """
    n, fam = len(dom), world.fam
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
    u_click = rng.random(n)
    split = np.digitize(rng.random(n), [0.8, 0.9])  # 0 train, 1 val, 2 test
    if fam.hot_items is not None:  # (e): drawn last, so the other columns stay as without it
        hot = np.flatnonzero(rng.random(n) < world.scales.e_hot_share)
        item[hot] = fam.hot_items[dom[hot], _zipf(rng, len(hot), fam.hot_items.shape[1])]
    cat = np.take(world.item_cat, item)
    u_lat = np.take(world.user_lat, user, axis=0)  # [n, d]
    i_lat = np.take(world.item_lat, item, axis=0)  # [n, d]
    logprice = np.take(world.item_logprice, item)
    shared = (0.7 * np.einsum("nd,nd->n", u_lat, i_lat) + np.take(world.item_bias, item)
              + np.take(world.cat_bias, cat) + 0.8 * (cat == pref)
              - 0.3 * (logprice - 3.0) - 0.12 * (position - 1)
              + np.take(world.dev_bias, device))
    terms = _terms(world, dom, user, item, cat, logprice)
    logit = shared + world.bias[dom]  # this order of sums keeps the default data bit for bit
    if "a" in terms:
        logit = logit + terms["a"]
    logit = logit + world.eta[gender, dom] + world.zeta[gender, cat] + world.beta0  # aux part
    for f in "bcde":
        if f in terms:
            logit = logit + terms[f]
    click = (u_click < expit(logit)).astype(np.int8)
    return dict(user_id=user, item_id=item, category=cat, device=device, position=position,
                gender=gender, dom=dom, hist_len=hist_len, hist_vals=hist_vals, split=split,
                logit=logit, logit_shared=shared + world.beta0, click=click,
                **{f"term_{f}": t for f, t in terms.items()})


def _terms(world: World, dom, user, item, cat, logprice) -> dict[str, np.ndarray]:
    """The logit term of each family that is on (module docstring), float [n] each."""
    k, n_items, fam, out = len(world.shares), len(world.item_by_rank), world.fam, {}
    if "a" in world.shifts:
        up, iq = world.user_proj.reshape(-1), world.item_proj.reshape(-1)  # [U*K*2], [I*K*2]
        ui, ii = (user * k + dom) * 2, (item * k + dom) * 2
        shift = np.take(up, ui) * np.take(iq, ii) + np.take(up, ui + 1) * np.take(iq, ii + 1)
        out["a"] = world.strength[dom] / np.sqrt(2) * shift
    key = dom * n_items + item  # (domain, item) pairs of families b and e
    if fam.cat_bias is not None:
        out["b"] = fam.cat_bias[dom, cat] + _lookup(fam.item_keys, fam.item_vals, key)
    if fam.price_slope is not None:
        out["c"] = fam.price_slope[dom] * (logprice - 3.0)
    if fam.city_effect is not None:
        out["d"] = fam.city_on[dom] * fam.city_effect[np.take(world.user_city, user)]
    if fam.hot_keys is not None:
        out["e"] = _lookup(fam.hot_keys, fam.hot_vals, key)
    return out
