"""Adapted layers: zero update at init, both factors train, per-row routing, merge, state, BN."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mdlora.adapters.lora import DomainLoRALinear, Router
from mdlora.adapters.multilora import MultiLoRALinear

DOMAINS = ["books", "films", "v1.2"]  # a dotted name exercises the key escaping
AUX = ["F", "M"]
D_IN, D_OUT, RANK = 6, 5, 3


def make(kind: str, seed: int = 0, **kw) -> nn.Module:
    """A fresh adapted layer: 'mlora', 'mlora_b' (b_random) or 'multi_<fusion>[_bn]'."""
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    if kind.startswith("mlora"):
        init = "b_random" if kind == "mlora_b" else "a_random"
        return DomainLoRALinear(base, DOMAINS, RANK, scaling=0.5, init=init, **kw)
    fusion = kind.split("_")[1]
    return MultiLoRALinear(
        base, DOMAINS, AUX, RANK, fusion=fusion, fusion_dim=4, domain_bn=kind.endswith("_bn"), **kw
    )


def randomise(layer: nn.Module, seed: int = 1) -> None:
    """Give every adapter parameter (and BN running stats) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if name.startswith("base.") or "num_batches" in name:
                continue
            noise = torch.randn(t.shape, generator=g) * 0.5
            t.copy_(noise.abs() + 0.5 if "running_var" in name else noise)


def run(
    layer: nn.Module, x: torch.Tensor, slots: list[int], aux: list[int] | None = None
) -> torch.Tensor:
    aux_t = torch.tensor(aux if aux is not None else [max(s, 0) % len(AUX) for s in slots])
    with layer.router.routing(
        torch.tensor(slots), aux_t if isinstance(layer, MultiLoRALinear) else None
    ):
        return layer(x)


KINDS = ["mlora", "mlora_b", "multi_attention", "multi_add", "multi_avg", "multi_attention_bn"]
X = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(7))
SLOTS = [0, 1, 2, -1, 1, 0, 2, 1]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_update_at_init_equals_base_exactly(kind, mode):
    """Residual BN (γ = β = 0) and zero U/b: the adapted layer starts exactly at the base."""
    layer = make(kind).train(mode == "train")
    assert torch.equal(run(layer, X, SLOTS), layer.base(X))
    assert torch.equal(run(layer, X, [1] * 8), layer.base(X))


def test_multilora_fusion_starts_neutral():
    """Q = 0: the domain and aux updates get weight 1/2 each, whatever they are."""
    layer = make("multi_attention")
    randomise(layer)
    with torch.no_grad():
        for q in layer.fusion_q.values():
            q.weight.zero_()
    fresh = make("multi_attention")
    assert all(torch.equal(q.weight, torch.zeros_like(q.weight)) for q in fresh.fusion_q.values())
    avg = make("multi_avg")
    avg.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("fusion_")}
    )
    torch.testing.assert_close(run(layer, X, SLOTS), run(avg, X, SLOTS), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kind, zero, rand", [("mlora", "B", "A"), ("mlora_b", "A", "B"), ("multi_attention", "U", "D")]
)
def test_zero_factor_gets_gradient_then_both_train(kind, zero, rand):
    """The factor that starts at zero gets a gradient at once; after two steps both moved."""
    layer = make(kind)

    def part(name):
        return getattr(layer.lora, name)["books"]

    before = {p: part(p).detach().clone() for p in (zero, rand)}
    opt = torch.optim.SGD([p for n, p in layer.named_parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        run(layer, X, [0] * 8).pow(2).sum().backward()
        if step == 0:
            assert part(zero).grad.abs().sum() > 0
        opt.step()
    for p in (zero, rand):
        assert not torch.equal(part(p), before[p]), f"{p} did not train"


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_separate_domain_passes(kind):
    layer = make(kind).eval()
    randomise(layer)
    aux = [0, 1, 1, 0, 0, 1, 0, 1]
    with torch.no_grad():
        mixed = run(layer, X, SLOTS, aux)
        for k in range(-1, len(DOMAINS)):
            for a in range(len(AUX)):
                rows = [
                    i for i, (s, b) in enumerate(zip(SLOTS, aux, strict=True)) if s == k and b == a
                ]
                if rows:
                    alone = run(layer, X[rows], [k] * len(rows), [a] * len(rows))
                    torch.testing.assert_close(mixed[rows], alone, atol=1e-6, rtol=0)
        assert torch.equal(mixed[3], layer.base(X)[3])  # slot -1: the base output (same GEMM shape)
        assert not torch.allclose(mixed[0], layer.base(X[0]))


@pytest.mark.parametrize("kind", ["mlora", "multi_attention_bn"])
def test_fast_path_equals_gathered_path(kind):
    layer = make(kind).eval()
    randomise(layer)
    slots, aux = torch.full((8,), 2), torch.ones(8, dtype=torch.long)
    with torch.no_grad():
        layer.router.set(slots, aux if kind != "mlora" else None)
        assert layer.router.domain.single == 2
        fast = layer(X)
        layer.router.fast_path = False
        layer.router.set(slots, aux if kind != "mlora" else None)
        assert layer.router.domain.single is None
        gathered = layer(X)
        assert torch.equal(run(layer, X, [-1] * 8), layer.base(X))  # masked path, no adapter
    torch.testing.assert_close(fast, gathered, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["mlora", "multi_add_bn"])
def test_3d_input_routes_by_leading_row(kind):
    layer = make(kind).eval()
    randomise(layer)
    x3 = torch.randn(4, 3, D_IN)
    with torch.no_grad():
        out = run(layer, x3, [0, 2, -1, 1])
        for i, s in enumerate([0, 2, -1, 1]):
            torch.testing.assert_close(out[i], run(layer, x3[i], [s] * 3), atol=1e-6, rtol=0)


def test_routing_errors_are_clear():
    layer = make("mlora")
    with pytest.raises(RuntimeError, match="no routing set"):
        layer(X)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        run(layer, X, [0, 1, 2, 3, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="slot -2 is out of range"):
        run(layer, X, [-2] + [0] * 7)
    with pytest.raises(ValueError, match="expected 8 rows"):
        run(layer, X[:4], SLOTS)
    with pytest.raises(ValueError, match="integer tensor"):
        Router().set(torch.zeros(8))
    multi = make("multi_add")
    with pytest.raises(RuntimeError, match="aux_slots"), multi.router.routing(torch.tensor(SLOTS)):
        multi(X)
    with pytest.raises(ValueError, match="aux_slots: slot 2 out of range"):
        run(multi, X, SLOTS, [2] * 8)
    with pytest.raises(ValueError, match="-1 on a row with a domain"):
        run(multi, X, SLOTS, [-1] * 8)


@pytest.mark.parametrize("domain", DOMAINS)
def test_merged_equals_unmerged(domain):
    layer = make("mlora")
    randomise(layer)
    slot = DOMAINS.index(domain)
    merged = layer.merged_linear(domain)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), run(layer, X, [slot] * 8), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in merged.parameters())


def test_safe_merge_refuses_non_finite():
    layer = make("mlora")
    with torch.no_grad():
        layer.lora.A["books"][0, 0] = float("nan")
        layer.lora.B["books"].fill_(1.0)
    with pytest.raises(ValueError, match="non-finite"):
        layer.merged_linear("books")
    assert torch.isnan(layer.merged_linear("books", safe=False).weight).any()
    layer.merged_linear("films")  # other domains still merge


@pytest.mark.parametrize("kind", ["mlora", "multi_attention_bn"])
def test_add_domain_leaves_others_bit_identical(kind):
    layer = make(kind)
    randomise(layer)
    before = {d: layer.domain_state(d) for d in DOMAINS}
    layer.add_domain("music")
    for d in DOMAINS:
        assert before[d].keys() == layer.domain_state(d).keys()
        assert all(torch.equal(v, layer.domain_state(d)[k]) for k, v in before[d].items())
    assert layer.domains[-1] == "music"
    with layer.router.routing(torch.full((8,), 3)):  # the new domain's own update starts at zero
        assert torch.equal(layer.lora(X, layer.router.domain), torch.zeros(8, D_OUT))
    with pytest.raises(ValueError, match="already has an adapter"):
        layer.add_domain("music")


@pytest.mark.parametrize("kind", ["mlora", "multi_attention_bn"])
def test_domain_state_round_trip(kind):
    src, dst = make(kind), make(kind)
    randomise(src, seed=3), randomise(dst, seed=4)
    if kind != "mlora":  # aux LoRAs are shared, not part of a domain's state
        dst.aux_lora.load_state_dict(src.aux_lora.state_dict())
    assert not torch.equal(run(src, X, [2] * 8), run(dst, X, [2] * 8))
    state = src.domain_state("v1.2")
    assert all("v1.2" not in k and "v1%2E2" not in k for k in state)
    dst.load_domain_state("v1.2", state)
    src.eval(), dst.eval()
    torch.testing.assert_close(run(src, X, [2] * 8), run(dst, X, [2] * 8), atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing keys"):
        dst.load_domain_state(
            "books", {k: v for k, v in state.items() if k != "bn.F.weight" and k != "A"}
        )
    with pytest.raises(ValueError, match="no adapter"):
        dst.domain_state("music")


def test_eval_cache_reuses_stack_and_sees_updates():
    layer = make("mlora").eval()
    randomise(layer)
    with torch.no_grad():
        first = run(layer, X, SLOTS)
        stack = layer.lora._stacks["lora"][1]
        assert run(layer, X, SLOTS) is not None and layer.lora._stacks["lora"][1] is stack
        layer.load_domain_state("books", {k: v * 2 for k, v in layer.domain_state("books").items()})
        second = run(layer, X, SLOTS)
    assert layer.lora._stacks["lora"][1] is not stack
    rows = [i for i, s in enumerate(SLOTS) if s == 0]
    assert not torch.allclose(first[rows], second[rows])
    torch.testing.assert_close(
        second[rows], run(layer, X[rows], [0] * len(rows)), atol=1e-6, rtol=0
    )


def test_routed_batch_norm_train_matches_batchnorm_per_group():
    """Train-mode BN normalises each combined domain with its own batch statistics."""
    layer = make("multi_add_bn").train()  # U = 0: the BN input is the base output h
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # γ, β away from their zero init (residual BN: y = h + BN(h))
        for p in layer.bn.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(12, D_IN)
    slots, aux = [0, 0, 0, 1, 1, 1, 1, 0, 2, -1, 0, 1], [0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 1]
    out = run(layer, x, slots, aux)
    h = layer.base(x).detach()
    for d, a in [(0, 0), (1, 1)]:
        own = layer.bn[DOMAINS[d]][AUX[a]]
        ref = nn.BatchNorm1d(D_OUT)
        ref.load_state_dict(own.state_dict())
        ref.running_mean.zero_(), ref.running_var.fill_(1), ref.num_batches_tracked.zero_()
        rows = [i for i in range(12) if slots[i] == d and aux[i] == a]
        torch.testing.assert_close(out[rows], h[rows] + ref(h[rows]), atol=1e-5, rtol=1e-5)
        bn = layer.bn[DOMAINS[d]][AUX[a]]
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == 1
    lone = layer.bn["v1%2E2"]["F"]  # the one row of (v1.2, F): running statistics, not updated
    assert torch.equal(lone.running_mean, torch.zeros(D_OUT)) and int(lone.num_batches_tracked) == 0
    lone_bn = layer.bn["v1%2E2"]["F"]
    torch.testing.assert_close(
        out[8], h[8] + h[8] / math.sqrt(1 + 1e-5) * lone_bn.weight + lone_bn.bias
    )
    assert torch.equal(out[9], h[9])  # slot -1
    out.sum().backward()
    assert layer.bn["books"]["F"].weight.grad is not None


ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("name", ["lora.py", "multilora.py"])
def test_layers_do_not_import_torch_distributed(name):
    assert not {n for n in _imports(ADAPTERS / name) if n.startswith("torch.distributed")}


def test_adapters_do_not_import_trainer_or_embeddings():
    for path in ADAPTERS.glob("*.py"):
        bad = {
            n
            for n in _imports(path)
            if n.split(".")[0] in ("trainer", "embeddings", "infra", "jobs")
        }
        assert not bad, f"{path.name} imports {bad}"
