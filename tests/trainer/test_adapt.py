"""Adapter training on cached features (mdlora.trainer.adapt): exactness, frozen backbone, gains, stopping."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mdlora.adapters.config import LoraConfig
from mdlora.adapters.inject import inject
from mdlora.adapters.wide import WideSpec
from mdlora.embeddings.batch import BatchConverter
from mdlora.embeddings.schema import Schema
from mdlora.embeddings.tables import build_ebc
from mdlora.trainer.adapt import (
    Features,
    Head,
    gain_confidence,
    materialise,
    predict,
    train_mlora,
    train_mlora_domain,
    train_multilora,
    wide_spec,
)
from mdlora.trainer.backbone import build_backbone
from mdlora.trainer.config import AdaptTrainConfig, LoopConfig, ModelConfig
from mdlora.trainer.features import WIDE_BAG, wide_ids
from mdlora.trainer.metrics import DomainMetrics

E, VOCAB = 8, ["a", "b", "c"]


def _head(seed: int = 0) -> Head:
    torch.manual_seed(seed)
    schema = Schema.from_dict({
        "name": "t", "label": "y", "domain": {"column": "d", "values": VOCAB},
        "tables": [{"name": "t", "num_embeddings": 10, "dim": E - 1}],
        "sparse": [{"name": "f", "table": "t"}], "dense": [{"name": "z"}]})
    head = Head.of(build_backbone(schema, ModelConfig(hidden=[16, 8]), build_ebc(schema, "cpu")))
    with torch.no_grad():
        head.out.weight.mul_(4.0)  # a confident backbone: AUC ~0.75 on unshifted domains
    return head


def _features(head: Head, n: int, seed: int, shift: dict[int, float]) -> Features:
    """Labels ~ Bernoulli(sigmoid(head(x) + s_d * 2 x0 x1)): the head is exact on unshifted domains."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, E, generator=g)
    dom = torch.randint(0, len(VOCAB), (n,), generator=g)
    aux = torch.randint(0, 2, (n, 1), generator=g)
    s = torch.tensor([shift.get(k, 0.0) for k in range(len(VOCAB))])[dom]
    with torch.no_grad():
        logit = head(x) + s * 2 * x[:, 0] * x[:, 1]
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return Features(x, y, dom, aux)


def _splits(head: Head, shift: dict, val_shift: dict | None = None, n: int = 6000) -> dict:
    return {"train": _features(head, n, 1, shift),
            "validation": _features(head, n // 4, 2, shift if val_shift is None else val_shift),
            "test": _features(head, n // 4, 3, shift)}


# no gate here (early stopping then sees every validation row); the gate has its own tests
CFG = AdaptTrainConfig(lr=2e-2, batch_size=256, confidence=0.0)


def _auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    m = DomainMetrics(["d"])
    m.update(probs, labels, torch.zeros_like(labels, dtype=torch.long))
    return m.compute(gather=False)["domains"]["d"]["auc"]
LORA = LoraConfig(alpha=4)


def test_materialised_x_equals_backbone_embed(tiny_schema_dict):
    schema = Schema.from_dict(tiny_schema_dict)
    torch.manual_seed(0)
    backbone = build_backbone(schema, ModelConfig(hidden=[8]), build_ebc(schema, "cpu"))
    rng = np.random.default_rng(0)
    n = 50
    table = pa.table({
        "click": rng.integers(0, 2, n), "domain": rng.choice(VOCAB, n), "gender": rng.choice(["F", "M"], n),
        "user_id": rng.integers(0, 10**6, n), "item_id": rng.integers(0, 50, n),
        "hist_items": [list(rng.integers(0, 50, k)) for k in rng.integers(0, 5, n)],
        "city": rng.choice(["x", "y", "z"], n), "price": rng.random(n) * 10, "age": rng.random(n) * 60})
    conv = BatchConverter(schema)
    batches = [conv.convert(table.slice(lo, 16)) for lo in range(0, n, 16)]
    feats = materialise(backbone, batches)
    expected = torch.cat([backbone.embed(b.sparse, b.dense) for b in batches]).detach()
    assert torch.equal(feats.x, expected) and feats.x.shape == (n, backbone.input_dim)
    assert torch.equal(feats.domains, torch.cat([b.domains for b in batches]))
    assert torch.equal(feats.aux, torch.cat([b.aux for b in batches]))
    # the head on cached x gives the backbone's logits exactly: why the cache is exact
    full = torch.cat([backbone(b.sparse, b.dense) for b in batches]).detach()
    assert torch.equal(Head.of(backbone)(feats.x).detach(), full)
    assert all(not p.requires_grad for p in Head.of(backbone).parameters())


def test_training_changes_only_adapter_tensors_and_beats_frozen_head_on_shifted_domain():
    head = _head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    results = train_mlora(head, LORA, VOCAB, ["a", "b"], _splits(head, {1: 1.5}), CFG, LoopConfig(epochs=4))
    assert {k: torch.equal(v, head.state_dict()[k]) for k, v in before.items()} == dict.fromkeys(before, True)
    # B starts at zero: on the shifted domain training moved every adapter factor
    assert results[1].best_epoch >= 1
    assert all(not torch.equal(t, torch.zeros_like(t)) for k, t in results[1].state.items() if k.endswith(".B"))
    # loading a trained state into a fresh copy leaves every base tensor bit-identical
    model = Head.of(head)
    adapted = inject(model, LORA, ["b"])
    adapted.load_state_for("b", results[1].state)
    base = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora." not in k}
    assert base.keys() == before.keys() and all(torch.equal(base[k], before[k]) for k in before)
    a, b = (r.metrics["test"] for r in results)
    assert b["auc_adapter"] > b["auc_backbone"] + 0.05, b  # the shifted domain gains
    assert a["auc_adapter"] > a["auc_backbone"] - 0.02, a  # the unshifted one does not lose
    assert set(b) == {f"{m}_{side}" for m in ("auc", "logloss", "ne", "calibration")
                      for side in ("backbone", "adapter")} | {"samples"}
    # same rows, so the same base-rate entropy: NE moves exactly as the log loss does
    assert b["ne_adapter"] / b["ne_backbone"] == pytest.approx(b["logloss_adapter"] / b["logloss_backbone"])
    assert b["ne_adapter"] < b["ne_backbone"] < 1.0 and 0.5 < b["calibration_backbone"] < 2.0, b
    assert b["samples"] == int((_features(head, 1500, 3, {}).domains == 1).sum())


def test_domains_train_independently_of_their_pack_and_partition():
    head = _head()
    splits = _splits(head, {0: 1.0, 2: -1.0}, n=2000)
    loop = LoopConfig(epochs=3, seed=3)
    packed = train_mlora(head, LORA, VOCAB, VOCAB, splits, AdaptTrainConfig(lr=2e-2, batch_size=256, pack=16), loop)  # one routed model
    alone = train_mlora_domain(head, LORA, "c", {s: f.of_domain(2) for s, f in splits.items()}, CFG, loop)
    one_by_one = train_mlora(head, LORA, VOCAB, ["c"], splits, AdaptTrainConfig(lr=2e-2, batch_size=256, pack=1), loop)
    for other in (alone, one_by_one[0]):  # equal up to float rounding (batch composition of GEMMs)
        assert other.best_epoch == packed[2].best_epoch and other.state.keys() == packed[2].state.keys()
        assert all(torch.allclose(other.state[k], packed[2].state[k], atol=1e-5) for k in other.state)
        assert other.metrics["test"]["auc_adapter"] == pytest.approx(packed[2].metrics["test"]["auc_adapter"], abs=1e-4)
    assert not torch.allclose(packed[0].state["tower.mlp.0.B"], packed[2].state["tower.mlp.0.B"])


def test_seeded_split_partitions_rows_9_to_1():
    f = _features(_head(), 1000, 5, {})
    parts, again = f.split(seed=4), f.split(seed=4)
    assert (len(parts["train"]), len(parts["validation"])) == (900, 100)
    rows = torch.cat([parts["train"].x, parts["validation"].x])
    assert torch.equal(rows[rows[:, 0].argsort()], f.x[f.x[:, 0].argsort()])  # a partition of the rows
    assert torch.equal(parts["validation"].x, again["validation"].x)  # same seed, same split
    assert not torch.equal(parts["validation"].x, f.split(seed=5)["validation"].x)


def test_early_stopping_keeps_the_best_state():
    head = _head()
    # validation follows the opposite shift: every epoch makes it worse, so the zero-update
    # initial state (epoch 0) is the best and is what comes back
    worse = train_mlora_domain(head, LORA, "b", {s: f.of_domain(1) for s, f in
                                                 _splits(head, {1: 1.5}, {1: -1.5}).items()},
                               CFG, LoopConfig(epochs=6, patience=2))
    assert worse.best_epoch == 0 and len(worse.history) == 2
    assert all(torch.equal(t, torch.zeros_like(t)) for k, t in worse.state.items() if k.endswith(".B"))
    v = worse.metrics["validation"]
    assert v["auc_adapter"] == pytest.approx(v["auc_backbone"], abs=1e-12)
    # validation agreeing with training: the kept epoch is the best one seen
    good = train_mlora_domain(head, LORA, "b", {s: f.of_domain(1) for s, f in _splits(head, {1: 1.5}).items()},
                              CFG, LoopConfig(epochs=4, patience=0))
    assert len(good.history) == 4 and good.best_epoch == 1 + int(np.argmax(good.history))
    assert good.metrics["validation"]["auc_adapter"] == pytest.approx(max(good.history), abs=1e-9)


def test_multilora_joint_training_with_shared_aux_lora():
    head = _head()
    lora = LoraConfig(method="multilora", alpha=4, aux="g", fusion="add")
    splits = _splits(head, {1: 1.5})
    results, shared = train_multilora(head, lora, VOCAB, ["a", "b"], ["F", "M"], 0, splits, CFG,
                                      LoopConfig(epochs=4, patience=2))
    assert shared and all(k.split(".aux_lora.")[1][0] in "DUsb" for k in shared)
    b = results[1].metrics["test"]
    assert b["auc_adapter"] > b["auc_backbone"] + 0.03, b
    # add-domain: a new domain trains against the frozen shared state, which comes back unchanged
    (c,), kept = train_multilora(head, lora, VOCAB, ["c"], ["F", "M"], 0, splits, CFG,
                                 LoopConfig(epochs=1), shared=shared)
    assert all(torch.equal(kept[k], shared[k]) for k in shared) and c.metrics["test"]["samples"] > 0


@pytest.mark.parametrize("method", ["mlora", "multilora"])
def test_adapted_head_starts_exactly_at_the_backbone(method):
    """Zero update, neutral fusion and residual BN: train- and eval-mode logits equal the head's."""
    head, f = _head(), _features(_head(), 512, 4, {})
    lora = LORA if method == "mlora" else LoraConfig(method="multilora", alpha=4, aux="g")
    model = Head.of(head)
    adapted = inject(model, lora, VOCAB, ["F", "M"] if method == "multilora" else None)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad(), adapted.routing(f.domains, f.aux[:, 0] if method == "multilora" else None):
            assert torch.equal(model(f.x), head(f.x))


def test_eval_every_validates_inside_epochs_and_keeps_the_best():
    head = _head()
    splits = {s: f.of_domain(1) for s, f in _splits(head, {1: 1.5}).items()}  # ~1500 train rows
    per_epoch = -(-len(splits["train"]) // 128)
    assert per_epoch % 6  # epochs end between two validations
    cfg = AdaptTrainConfig(lr=2e-2, batch_size=128, eval_every=6, confidence=0.0)
    r = train_mlora_domain(head, LORA, "b", splits, cfg, LoopConfig(epochs=2))
    at = sorted({*range(6, 2 * per_epoch + 1, 6), per_epoch, 2 * per_epoch})  # steps validated at
    assert len(r.history) == len(at) and r.best_step == at[int(np.argmax(r.history))]
    assert r.epochs_run == 2 < len(r.history)  # epochs, not validations
    assert r.best_epoch == 1 + (r.best_step > per_epoch)
    assert r.metrics["validation"]["auc_adapter"] == pytest.approx(max(r.history), abs=1e-9)


def test_multilora_kept_states_were_validated_with_the_returned_shared_state():
    head = _head()
    lora = LoraConfig(method="multilora", alpha=4, aux="g")
    splits = _splits(head, {0: 1.0, 1: -1.5})
    results, shared = train_multilora(head, lora, VOCAB, VOCAB, ["F", "M"], 0, splits,
                                      AdaptTrainConfig(lr=2e-2, batch_size=256, eval_every=8),
                                      LoopConfig(epochs=3, patience=2))
    model = Head.of(head)
    adapted = inject(model, lora, VOCAB, ["F", "M"])
    adapted.load_shared_state(shared)
    for r in results:
        adapted.load_state_for(r.domain, r.state)
        v = r.metrics["validation"]
        assert v["auc_adapter"] >= max([h for h in r.history if h is not None], default=-1) - 1e-9
    val = splits["validation"]
    probs = predict(model, adapted, val, val.domains, 0)
    for k, r in enumerate(results):  # the assembled bundle reproduces each domain's kept score
        m = val.domains == k
        assert _auc(probs[m], val.labels[m]) == pytest.approx(r.metrics["validation"]["auc_adapter"], abs=1e-9)
    assert results[1].metrics["test"]["auc_adapter"] > results[1].metrics["test"]["auc_backbone"] + 0.03


def test_multilora_falls_back_to_the_backbone_when_nothing_beats_it_on_validation():
    head = _head()
    lora = LoraConfig(method="multilora", alpha=4, aux="g")
    splits = _splits(head, {1: 1.5}, {1: -1.5})  # validation follows the opposite shift
    splits = {s: f.of_domain(1) for s, f in splits.items()}
    (r,), shared = train_multilora(head, lora, VOCAB, ["b"], ["F", "M"], 0, splits, CFG,
                                   LoopConfig(epochs=3, patience=1))
    assert all(torch.equal(t, torch.zeros_like(t)) for k, t in shared.items() if k.endswith((".U.F", ".U.M")))
    v = r.metrics["validation"]
    assert r.best_epoch == 0 and v["auc_adapter"] == pytest.approx(v["auc_backbone"], abs=1e-12)


def test_min_delta_keeps_the_backbone_unless_validation_gains_more():
    head = _head()
    splits = {s: f.of_domain(1) for s, f in _splits(head, {1: 1.5}).items()}
    gains = train_mlora_domain(head, LORA, "b", splits, CFG, LoopConfig(epochs=2))
    v = gains.metrics["validation"]
    assert gains.best_epoch >= 1 and v["auc_adapter"] > v["auc_backbone"]
    margin = v["auc_adapter"] - v["auc_backbone"] + 1e-3  # more than the best gain seen
    kept = train_mlora_domain(head, LORA, "b", splits, AdaptTrainConfig(lr=2e-2, batch_size=256, min_delta=margin, confidence=0.0),
                              LoopConfig(epochs=2))
    assert kept.best_epoch == 0 and len(kept.history) == 2
    assert kept.metrics["validation"]["auc_adapter"] == pytest.approx(v["auc_backbone"], abs=1e-12)


def test_gain_confidence_is_a_paired_bootstrap_of_the_auc_difference():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) < 0.4).float()
    base = torch.rand(400, generator=g)
    better = 0.6 * y + torch.rand(400, generator=g)  # AUC ~0.8 against base's ~0.5
    assert gain_confidence(base, base.clone(), y, 50, 0) == 0.5  # every resample a tie
    assert gain_confidence(base, better, y, 100, 0) > 0.99
    assert gain_confidence(better, base, y, 100, 0) < 0.01
    assert gain_confidence(base, better, y, 100, 0) == gain_confidence(base, better, y, 100, 0)  # seeded
    assert gain_confidence(base, better, torch.ones(400), 10, 0) is None  # one class: no AUC


def test_gain_confidence_in_parts_equals_one_u_per_draw():
    """U is computed on a few resamples at a time (bounded memory): the same wins as all of a draw at once."""
    from scipy.stats import mannwhitneyu

    g = torch.Generator().manual_seed(1)
    n = 20_000  # a draw of 100 resamples, U on parts of 12
    y = (torch.rand(n, generator=g) < 0.3).float()
    base = torch.rand(n, generator=g)
    other = base + 0.3 * torch.rand(n, generator=g)  # no better: about half the resamples
    pos, neg = np.flatnonzero(y.numpy() == 1), np.flatnonzero(y.numpy() == 0)
    rng, wins = np.random.default_rng(7), 0.0
    for r in (100, 20):
        ip, ineg = pos[rng.integers(0, len(pos), (r, len(pos)))], neg[rng.integers(0, len(neg), (r, len(neg)))]
        u_a, u_b = (mannwhitneyu(m.numpy()[ip], m.numpy()[ineg], axis=1, method="asymptotic").statistic
                    for m in (other, base))
        wins += float((u_a > u_b).sum() + 0.5 * (u_a == u_b).sum())
    assert gain_confidence(base, other, y, 120, 7) == wins / 120 and 0.0 < wins / 120 < 1.0


def test_confidence_gate_resets_a_noise_gain_and_keeps_a_real_one():
    head = _head()
    splits = _splits(head, {1: 1.5}, n=4000)  # "a" is unshifted: the backbone is exact there
    loop = LoopConfig(epochs=3, patience=3, seed=0)
    cfg = {"lr": 2e-2, "batch_size": 256, "eval_every": 2}
    open_ = train_mlora(head, LORA, VOCAB, ["a", "b"], splits, AdaptTrainConfig(**cfg, confidence=0.0), loop)
    gated = train_mlora(head, LORA, VOCAB, ["a", "b"], splits, AdaptTrainConfig(**cfg, confidence=0.9), loop)
    # ungated, "a" keeps a state that won on validation by chance and loses on test
    a = open_[0].metrics
    assert open_[0].best_step > 0 and open_[0].confidence is None
    assert a["validation"]["auc_adapter"] > a["validation"]["auc_backbone"]
    assert a["test"]["auc_adapter"] < a["test"]["auc_backbone"]
    # gated, the same gain is not convincing: "a" serves the backbone exactly
    assert gated[0].confidence is not None and gated[0].confidence < 0.9
    assert gated[0].best_epoch == gated[0].best_step == 0
    assert all(torch.equal(t, torch.zeros_like(t)) for k, t in gated[0].state.items() if k.endswith((".B", ".bias")))
    for split in ("validation", "test"):
        m = gated[0].metrics[split]
        assert m["auc_adapter"] == pytest.approx(m["auc_backbone"], abs=1e-12)
    # the shifted domain's gain is real: it holds on the gate's unseen half and is kept
    assert gated[1].confidence >= 0.9 and gated[1].best_step > 0
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in gated[1].state.items() if k.endswith(".B"))
    assert gated[1].metrics["test"]["auc_adapter"] > gated[1].metrics["test"]["auc_backbone"] + 0.05


def test_confidence_must_be_a_share():
    with pytest.raises(ValueError, match="confidence"):
        AdaptTrainConfig(confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        AdaptTrainConfig(resamples=0)


# ---- wide adapters ---------------------------------------------------------------------------------


def _id_shifted(head: Head, n: int, seed: int) -> Features:
    """Labels shifted by a per-domain effect of an id that x does not carry: only a per-domain
    table of that id can fit it (domain c has none)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, E, generator=g)
    dom = torch.randint(0, len(VOCAB), (n,), generator=g)
    ids = torch.randint(0, 10, (n, 1), generator=g)
    effect = torch.randn(len(VOCAB), 10, generator=torch.Generator().manual_seed(7)) * 1.5
    effect[2] = 0.0
    with torch.no_grad():
        logit = head(x) + effect[dom, ids[:, 0]]
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    return Features(x, y, dom, torch.zeros(n, 0, dtype=torch.long), ids)


def test_a_wide_adapter_fits_a_per_domain_id_effect_that_the_tower_lora_cannot():
    head = _head()
    splits = {s: _id_shifted(head, n, seed) for s, n, seed in (("train", 6000, 1), ("validation", 1500, 2),
                                                               ("test", 1500, 3))}
    spec = WideSpec(sparse=(("f", 10, 1),), num_dense=1)
    tower = train_mlora(head, LORA, VOCAB, VOCAB, splits, CFG, LoopConfig(epochs=4, patience=2, seed=0))
    wide = train_mlora(head, LoraConfig(alpha=4, wide=["f"]), VOCAB, VOCAB, splits, CFG,
                       LoopConfig(epochs=4, patience=2, seed=0), spec)
    gain = {r.domain: r.metrics["test"]["auc_adapter"] - r.metrics["test"]["auc_backbone"] for r in wide}
    tower_gain = {r.domain: r.metrics["test"]["auc_adapter"] - r.metrics["test"]["auc_backbone"] for r in tower}
    assert gain["a"] > 0.03 and gain["b"] > 0.03, gain
    assert gain["a"] > tower_gain["a"] + 0.02 and gain["b"] > tower_gain["b"] + 0.02, (gain, tower_gain)
    assert abs(gain["c"]) < 0.01, gain  # nothing to fit: stays at (about) the backbone
    assert wide[0].state["out.wide"].shape == (10,) and set(tower[0].state) < set(wide[0].state)


def test_multilora_trains_a_wide_adapter_beside_its_shared_aux_loras():
    head = _head()
    splits = {s: _id_shifted(head, n, seed) for s, n, seed in (("train", 6000, 1), ("validation", 1500, 2),
                                                               ("test", 1500, 3))}
    for f in splits.values():
        f.aux = torch.randint(0, 2, (len(f), 1), generator=torch.Generator().manual_seed(0))
    lora = LoraConfig(method="multilora", alpha=4, aux="g", wide=["f"])
    results, shared = train_multilora(head, lora, VOCAB, VOCAB, ["F", "M"], 0, splits, CFG,
                                      LoopConfig(epochs=3, patience=2), wide=WideSpec(sparse=(("f", 10, 1),),
                                                                                      num_dense=1))
    assert shared and not any("wide" in k for k in shared)  # the wide tables are each domain's own
    a = results[0].metrics["test"]
    assert results[0].state["out.wide"].abs().sum() > 0 and a["auc_adapter"] > a["auc_backbone"] + 0.03, a


def test_wide_spec_reads_the_schema_and_names_a_bad_feature(tiny_schema_dict):
    schema = Schema.from_dict(tiny_schema_dict)
    spec = wide_spec(schema, LoraConfig(wide=["*"], wide_buckets=4))
    assert [n for n, _, _ in spec.sparse] == schema.feature_names
    assert [n for n, _ in spec.dense] == schema.dense_names and spec.num_dense == len(schema.dense_names)
    for name, entries, slots in spec.sparse:
        f = next(f for f in schema.sparse if f.name == name)
        assert entries == min(4, schema.table(f.table).num_embeddings)
        assert slots == ((f.max_len or WIDE_BAG) if f.multi else 1)
    assert not wide_spec(schema, LoraConfig())
    with pytest.raises(ValueError, match="lora.wide: 'nope' is not a feature"):
        wide_spec(schema, LoraConfig(wide=["nope"]))


def test_wide_ids_pad_each_bag_with_minus_one():
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "h"], values=torch.tensor([5, 7, 1, 2, 3]), lengths=torch.tensor([1, 1, 3, 0]))
    spec = WideSpec(sparse=(("h", 4, 2), ("u", 9, 1)))
    assert wide_ids(spec, kjt).tolist() == [[1, 2, 5], [-1, -1, 7]]  # h's bag cut at its 2 slots
