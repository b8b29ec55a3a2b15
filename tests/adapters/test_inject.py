"""inject(): target selection, ranks, freezing, per-domain state, merge, and real learning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mdlora.adapters.config import LoraConfig
from mdlora.adapters.inject import inject
from mdlora.adapters.lora import DomainLoRALinear
from mdlora.adapters.multilora import MultiLoRALinear
from mdlora.config import ConfigError, from_dict

DOMAINS, AUX = ["books", "films"], ["F", "M"]


class Tower(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.mlp(x)


class Tiny(nn.Module):
    """embedding -> tower.mlp (Linears named tower.mlp.0, tower.mlp.2, ...) -> logit."""

    def __init__(self, widths=(8, 16, 8, 1), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, widths[0])
        self.tower = Tower(list(widths))

    def forward(self, ids):
        return self.tower(self.emb(ids)).squeeze(-1)


def adapted(method="mlora", seed=0, **cfg):
    cfg = {"alpha": 4, **({"aux": "gender"} if method == "multilora" else {}), **cfg}
    model = Tiny(seed=seed)
    return model, inject(
        model, LoraConfig(method=method, **cfg), DOMAINS, AUX if method == "multilora" else None
    )


def randomise(handle, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.adapter_params().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


IDS = torch.arange(10)
SLOTS = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0])
AUX_SLOTS = torch.tensor([0, 1, 0, 0, 1, 1, 1, 0, 0, 0])


def test_rank_from_alpha_and_explicit_list():
    cfg = LoraConfig(alpha=32)
    assert cfg.ranks_for(["a", "b", "c"], [256, 1, 100]) == [8, 1, 3]
    assert LoraConfig().alpha == 128.0  # the default keeps a 256-128 tower adapter under 3 %
    assert LoraConfig(ranks=[2, 3]).ranks_for(["a", "b"], [256, 1]) == [2, 3]
    _, h = adapted(alpha=4)
    assert [layer.lora.rank for layer in h.layers.values()] == [4, 2, 1]  # out 16, 8, 1
    with pytest.raises(ValueError, match=r"ranks: 2 ranks \[2, 3\] for 3 target layers"):
        adapted(alpha=None, ranks=[2, 3])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"ranks": [2, 0]}, "ranks: needs one rank >= 1"),
        ({"alpha": 0}, "alpha: must be > 0"),
        ({"alpha": 4, "ranks": [1]}, "alpha/ranks: set exactly one"),
        ({"method": "dora"}, "method: 'dora' is not one of"),
        ({"method": "multilora"}, "aux: method multilora needs"),
        ({"aux": "gender"}, "aux: only used by method multilora"),
        ({"fusion_dim": 0}, "fusion_dim: must be >= 1"),
        ({"rank": 4}, "rank: unknown key"),
    ],
)
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(LoraConfig, bad)


@pytest.mark.parametrize("method", ["mlora", "multilora"])
def test_targets_freeze_and_adapter_params(method):
    model, h = adapted(method, targets=["mlp.0", "mlp.4"])
    assert list(h.layers) == ["tower.mlp.0", "tower.mlp.4"]
    assert type(model.tower.mlp[2]) is nn.Linear
    kind = DomainLoRALinear if method == "mlora" else MultiLoRALinear
    assert all(isinstance(model.get_submodule(n), kind) for n in h.layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(h.adapter_params()) and trainable
    assert not any(".base." in n or n.startswith("emb") or "mlp.2" in n for n in trainable)
    with h.routing(SLOTS, AUX_SLOTS if method == "multilora" else None):
        model(IDS).sum().backward()
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert frozen and all(p.grad is None for p in frozen)


def test_param_count_per_domain():
    _, h = adapted(
        alpha=4
    )  # Linears 8->16 (r 4), 16->8 (r 2), 8->1 (r 1): r (d_in + d_out) + d_out
    assert h.param_count("books") == (4 * 24 + 16) + (2 * 24 + 8) + (1 * 9 + 1)
    _, m = adapted("multilora", alpha=4, fusion_dim=2)  # + fusion 2 d_out f + BN 2 aux * 2 d_out
    lora = (4 * 24 + 2 * 16) + (2 * 24 + 2 * 8) + (1 * 9 + 2)
    assert m.param_count("books") == lora + 2 * 2 * (16 + 8 + 1) + 2 * 2 * (16 + 8 + 1)


def test_target_warnings_and_errors():
    with pytest.warns(UserWarning, match=r"'head\.\*' matches no nn.Linear"):
        adapted(targets=["mlp.0", "head.*"])
    with pytest.raises(ValueError, match="match no nn.Linear"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted(targets=["head.*"])
    with pytest.raises(ValueError, match="root: model has no submodule 'trunk'"):
        inject(Tiny(), LoraConfig(), DOMAINS, root="trunk")
    model, _ = adapted()
    with pytest.raises(ValueError, match="already has adapters"):
        inject(model, LoraConfig(), DOMAINS)
    with pytest.raises(ValueError, match="aux_values: needed by multilora only"):
        inject(Tiny(), LoraConfig(method="multilora", aux="gender"), DOMAINS)
    with pytest.raises(ValueError, match="domains: expected distinct"):
        inject(Tiny(), LoraConfig(), ["a", "a"])


def test_multihead_attention_out_proj_is_not_a_target():
    model = nn.Module()
    model.tower = nn.Module()
    model.tower.attn, model.tower.proj = nn.MultiheadAttention(4, 2), nn.Linear(4, 4)
    h = inject(model, LoraConfig(), DOMAINS)
    assert list(h.layers) == ["tower.proj"]


@pytest.mark.parametrize("method", ["mlora", "multilora"])
def test_model_mixed_batch_equals_per_domain_passes(method):
    model, h = adapted(method)
    randomise(h)
    model.eval()
    aux = AUX_SLOTS if method == "multilora" else None
    with torch.no_grad():
        with h.routing(SLOTS, aux):
            mixed = model(IDS)
        for k in (-1, 0, 1):
            rows = SLOTS == k
            with h.routing(SLOTS[rows], None if aux is None else aux[rows]):
                torch.testing.assert_close(mixed[rows], model(IDS[rows]), atol=1e-6, rtol=0)


def test_unrouted_rows_equal_the_frozen_model():
    model, h = adapted()
    randomise(h)
    reference = Tiny()
    with torch.no_grad(), h.routing(SLOTS):
        out = model(IDS)
    torch.testing.assert_close(out[SLOTS == -1], reference(IDS)[SLOTS == -1], atol=0, rtol=0)
    assert not torch.allclose(out[SLOTS == 0], reference(IDS)[SLOTS == 0])


@pytest.mark.parametrize("method", ["mlora", "multilora"])
def test_state_for_round_trip_and_add_domain(method):
    src_model, src = adapted(method)
    dst_model, dst = adapted(method)
    randomise(src, seed=2)
    state = src.state_for("films")
    assert "tower.mlp.0.A" in state or "tower.mlp.0.U" in state
    dst.load_state_for("films", state)
    dst.load_shared_state(src.shared_state())
    aux = torch.ones(10, dtype=torch.long) if method == "multilora" else None
    src_model.eval(), dst_model.eval()
    with torch.no_grad():
        with src.routing(torch.ones(10, dtype=torch.long), aux):
            want = src_model(IDS)
        with dst.routing(torch.ones(10, dtype=torch.long), aux):
            torch.testing.assert_close(dst_model(IDS), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"missing keys \['tower.mlp.0."):
        dst.load_state_for(
            "films", {k: v for k, v in state.items() if not k.startswith("tower.mlp.0.")}
        )
    before = {d: src.state_for(d) for d in DOMAINS}
    src.add_domain("music")
    assert src.domain_names == [*DOMAINS, "music"]
    for d in DOMAINS:
        assert all(torch.equal(v, src.state_for(d)[k]) for k, v in before[d].items())
    assert src.param_count("music") == src.param_count("books")
    assert set(src.adapter_params("music")) <= set(src.adapter_params())


def test_merge_equals_routed_model_and_shares_frozen_tensors():
    model, h = adapted()
    randomise(h)
    merged = h.merge("films")
    assert not any(isinstance(m, DomainLoRALinear) for m in merged.modules())
    assert merged.emb.weight is model.emb.weight  # frozen tensors shared, not copied
    with torch.no_grad(), h.routing(torch.ones(10, dtype=torch.long)):
        torch.testing.assert_close(merged(IDS), model(IDS), atol=1e-6, rtol=0)
    assert isinstance(model.tower.mlp[0], DomainLoRALinear)  # the adapted model is untouched
    _, m = adapted("multilora")
    with pytest.raises(ValueError, match="only mlora adapters merge"):
        m.merge("books")


@pytest.mark.parametrize(
    "method, init", [("mlora", "a_random"), ("mlora", "b_random"), ("multilora", "a_random")]
)
def test_lora_learns_a_shifted_target_on_a_frozen_mlp(method, init):
    """100 Adam steps on one domain's adapters fit a shifted teacher the frozen MLP cannot."""
    torch.manual_seed(0)
    cfg = {
        "alpha": 4,
        "init": init,
        **({"aux": "g", "domain_bn": False} if method == "multilora" else {}),
    }
    tower = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    model = nn.Sequential()
    model.tower = tower
    h = inject(
        model, LoraConfig(method=method, **cfg), ["d0"], ["a"] if method == "multilora" else None
    )
    x = torch.randn(256, 8)
    with torch.no_grad(), h.routing(torch.full((256,), -1), torch.zeros(256, dtype=torch.long)):
        y = model(x) + 0.5 * x[:, :1] - 0.3 * x[:, 1:2]  # shifted target
    opt = torch.optim.Adam(h.adapter_params("d0").values(), lr=1e-2)
    losses = []
    for _ in range(100):
        with h.routing(torch.zeros(256, dtype=torch.long), torch.zeros(256, dtype=torch.long)):
            loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
