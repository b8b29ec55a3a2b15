"""The click model of the synthetic logs: each shift family changes per-domain CTR structure the
way infra/synth_world.py says, and the default world is the one the generator always had."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from mdlora.infra import synth_world as sw

K, N, USERS, ITEMS = 4, 15_000, 5000, 3000  # domains, rows per domain, ids


@pytest.fixture(scope="module")
def draws() -> dict:
    """Worlds (seed 5) and rows (rng 0, N per domain) for each family alone on top of (a)."""
    dom = np.repeat(np.arange(K), N)
    out = {}
    for shifts in ("a", "ab", "ac", "ad", "ae", "abcde"):
        world = sw.make_world(5, domains=K, users=USERS, items=ITEMS, shifts=tuple(shifts))
        out[shifts] = world, sw.draw_rows(world, np.random.default_rng(0), dom)
    return out


def _dom(c: dict, k: int) -> np.ndarray:
    return c["dom"] == k


def test_default_world_pinned():
    """Values recorded from the generator before the families b-e existed (same seed)."""
    world = sw.make_world(5, domains=4, users=500, items=400)
    c = sw.draw_rows(world, np.random.default_rng(0), np.repeat(np.arange(4), 50))
    assert world.shifts == ("a",) and set(c) >= {"term_a"} and "term_b" not in c
    assert world.beta0 == pytest.approx(-0.8051800983217714, rel=1e-9)
    assert c["logit"][:3] == pytest.approx([-2.468543837195538, 0.744133357601565,
                                           -1.0910284076389487], rel=1e-6)
    assert int(c["click"].sum()) == 68 and c["item_id"][:5].tolist() == [264, 46, 294, 294, 261]


def test_families_keep_rows_and_each_others_parameters(draws):
    """b, c, d change only clicks; e changes only the items (and clicks) of some rows; a family's
    parameters do not depend on which other families are on."""
    base = draws["a"][1]
    for shifts in ("ab", "ac", "ad"):
        c = draws[shifts][1]
        for col in ("user_id", "item_id", "device", "position", "gender", "split", "hist_vals"):
            assert np.array_equal(c[col], base[col]), (shifts, col)
        assert not np.array_equal(c["click"], base["click"]), shifts
    e = draws["ae"][1]
    assert np.array_equal(e["user_id"], base["user_id"])
    moved = (e["item_id"] != base["item_id"]).mean()
    assert 0.2 < moved < 0.32  # ~ e_hot_share, less the hot draws that hit the same item
    fam, alone = draws["abcde"][0].fam, {f: draws[f"a{f}"][0].fam for f in "bcde"}
    assert np.array_equal(fam.cat_bias, alone["b"].cat_bias)
    assert np.array_equal(fam.item_vals, alone["b"].item_vals)
    assert np.array_equal(fam.price_slope, alone["c"].price_slope)
    assert np.array_equal(fam.city_on, alone["d"].city_on)
    assert np.array_equal(fam.hot_items, alone["e"].hot_items)


def test_b_domains_rank_categories_and_items_differently(draws):
    """(b) the per-domain CTR ranking of the 8 largest categories differs between domains (it
    agrees without b), and items with a positive per-domain bias outclick negative ones."""

    def mean_rank_corr(c: dict) -> float:
        ctr = [[c["click"][_dom(c, k) & (c["category"] == j)].mean() for j in range(8)]
               for k in range(K)]
        return float(np.mean([spearmanr(ctr[i], ctr[j])[0]
                              for i in range(K) for j in range(i + 1, K)]))

    (world, on), off = draws["ab"], draws["a"][1]
    assert mean_rank_corr(off) > 0.85
    assert mean_rank_corr(on) < mean_rank_corr(off) - 0.3
    gap = {}
    for name, c in (("on", on), ("off", off)):
        ib = sw._lookup(world.fam.item_keys, world.fam.item_vals, c["dom"] * ITEMS + c["item_id"])
        gap[name] = np.mean([c["click"][_dom(c, k) & (ib > 0.3)].mean()
                             - c["click"][_dom(c, k) & (ib < -0.3)].mean() for k in range(K)])
    assert gap["on"] > 0.15 and gap["on"] > gap["off"] + 0.1


def test_c_price_slope_differs_per_domain(draws):
    """(c) the per-domain logistic slope of click on log price moves by sign(gamma_k) against the
    same rows without c, so domains end on both sides of zero."""
    (world, on), off = draws["ac"], draws["a"][1]
    x = world.item_logprice[on["item_id"]].astype(np.float64)[:, None] - 3.0

    def slope(c: dict, k: int) -> float:
        m = _dom(c, k)
        return float(LogisticRegression().fit(x[m], c["click"][m]).coef_[0, 0])

    gamma = world.fam.price_slope
    assert (gamma > 0).any() and (gamma < 0).any()
    fit_on, fit_off = [slope(on, k) for k in range(K)], [slope(off, k) for k in range(K)]
    for k in range(K):
        assert np.sign(fit_on[k] - fit_off[k]) == np.sign(gamma[k]), k
        assert abs(fit_on[k] - fit_off[k]) > 0.15, k
    assert max(fit_off) < 0 and max(fit_on) > 0.05 and min(fit_on) < -0.3


def test_d_city_matters_only_in_some_domains(draws):
    """(d) the fitted effect of the city effect v[city_u] on clicks is ~0 in the domains where
    it is off (and everywhere without d), clearly positive where it is on."""
    (world, on), off = draws["ad"], draws["a"][1]
    v = world.fam.city_effect[world.user_city[on["user_id"]]][:, None]
    assert 0 < world.fam.city_on.sum() < K

    def effect(c: dict, k: int) -> float:
        m = _dom(c, k)
        return float(LogisticRegression().fit(v[m], c["click"][m]).coef_[0, 0])

    for k in range(K):
        assert abs(effect(off, k)) < 0.15, k
        if world.fam.city_on[k]:
            assert effect(on, k) > 0.5, k
        else:
            assert abs(effect(on, k)) < 0.15, k
            assert not on["term_d"][_dom(on, k)].any()


def test_e_domains_have_their_own_head(draws):
    """(e) each domain's 10 most shown items include several of its own hot items (without e all
    domains share the global head), and a hot item's click effect shows in its clicks."""
    (world, on), off = draws["ae"], draws["a"][1]

    def heads(c: dict) -> list[set]:
        return [set(np.bincount(c["item_id"][_dom(c, k)], minlength=ITEMS).argsort()[-10:])
                for k in range(K)]

    def overlap(h: list[set]) -> float:
        return float(np.mean([len(h[i] & h[j]) / len(h[i] | h[j])
                              for i in range(K) for j in range(i + 1, K)]))

    h_on, h_off = heads(on), heads(off)
    assert overlap(h_off) > 0.7 and overlap(h_on) < 0.45
    for k in range(K):
        assert len(h_on[k] & set(world.fam.hot_items[k])) >= 3, k
    # the click effect: the same world with hb = 0 shows the same rows; per (domain, hot item)
    # the CTR gained over it rises with the item's effect hb
    zero = dataclasses.replace(sw.SCALES, e_hot_mean=0.0, e_hot_sd=0.0)
    world0 = sw.make_world(5, domains=K, users=USERS, items=ITEMS, shifts=("a", "e"), scales=zero)
    flat = sw.draw_rows(world0, np.random.default_rng(0), on["dom"])
    assert np.array_equal(world0.fam.hot_items, world.fam.hot_items)
    assert np.array_equal(flat["item_id"], on["item_id"])
    eff, gain = [], []
    for k in range(K):
        for item in world.fam.hot_items[k]:
            m = _dom(on, k) & (on["item_id"] == item)
            if m.sum() >= 50:
                eff.append(sw._lookup(world.fam.hot_keys, world.fam.hot_vals,
                                      np.array([k * ITEMS + item]))[0])
                gain.append(on["click"][m].mean() - flat["click"][m].mean())
    assert len(eff) >= 30 and spearmanr(eff, gain)[0] > 0.7
    assert np.mean(gain) > 0.05  # hot items click more in their domain (mean effect > 0)


def test_a_domain_shift_is_real():
    """(a) A per-domain logistic regression on vec(p_u q_i^T) beats the pooled one most where the
    shift is strongest, and its coefficients point elsewhere."""
    from sklearn.metrics import roc_auc_score

    world = sw.make_world(5, domains=4, users=5000, items=3000)
    dom = np.repeat(np.arange(4), 12_000)
    c = sw.draw_rows(world, np.random.default_rng(0), dom)
    x = np.einsum("nd,ne->nde", world.user_lat[c["user_id"]], world.item_lat[c["item_id"]])
    x, y, tr = x.reshape(len(dom), -1), c["click"], c["split"] == 0
    pooled = LogisticRegression(max_iter=200).fit(x[tr], y[tr])
    gain, cos = {}, {}
    for k in (int(np.argmax(world.strength)), int(np.argmin(world.strength))):
        m = dom == k
        own = LogisticRegression(max_iter=200).fit(x[tr & m], y[tr & m])
        te = ~tr & m
        gain[k] = roc_auc_score(y[te], own.decision_function(x[te])) - roc_auc_score(
            y[te], pooled.decision_function(x[te])
        )
        a, b = own.coef_.ravel(), pooled.coef_.ravel()
        cos[k] = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    strong, weak = int(np.argmax(world.strength)), int(np.argmin(world.strength))
    assert gain[strong] > 0.05 and gain[strong] > gain[weak] + 0.03
    assert cos[strong] < 0.8 and cos[strong] < cos[weak]


@pytest.mark.parametrize(
    "value, want",
    [("a", ("a",)), ("c,a", ("a", "c")), (" a , e ", ("a", "e")), ("none", ()), ("", ()),
     (("b", "d"), ("b", "d")), ("a,b,c,d,e", tuple("abcde"))],
)
def test_parse_shifts(value, want):
    assert sw.parse_shifts(value) == want


@pytest.mark.parametrize("value", ["a,x", "f", "abc", "a,a", "A", ("a", "z")])
def test_parse_shifts_refuses(value):
    with pytest.raises(ValueError, match="--shifts") as err:
        sw.parse_shifts(value)
    assert repr(value) in str(err.value)
