"""The wide adapter: per-domain id tables and dense slopes added to the frozen output layer."""

import pytest
import torch
from torch import nn

from mdlora.adapters.config import LoraConfig
from mdlora.adapters.inject import inject
from mdlora.adapters.wide import WideOutput, WideSpec

# item: 8 entries, 1 slot; tags: 4 entries, a bag of 3 slots; dense block of 2, slope on column 1
SPEC = WideSpec(sparse=(("item", 8, 1), ("tags", 4, 3)), dense=(("price", 1),), num_dense=2)


def _layer(domains=("a", "b")) -> WideOutput:
    torch.manual_seed(0)
    return WideOutput(nn.Linear(4, 1), list(domains), SPEC)


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (n, 4), generator=g)
    ids[0, 2:] = -1  # a bag of one
    ids[1, 1:] = -1  # an empty bag
    return torch.randn(n, 4, generator=g), ids, torch.randn(n, 2, generator=g)


def test_it_starts_exactly_at_the_base_output():
    layer, (z, ids, dense) = _layer(), _inputs()
    with layer.router.routing(torch.tensor([0, 1, -1, 0, 1, 0]), wide=(ids, dense)):
        assert torch.equal(layer(z), layer.base(z))


def test_the_term_is_the_domain_tables_at_the_ids_a_bag_averaged_plus_the_slopes():
    layer, (z, ids, dense) = _layer(), _inputs()
    with torch.no_grad():
        layer.wide["b"].copy_(torch.arange(13, dtype=torch.float) / 10)  # T = 8 + 4, M = 1
    w = layer.wide["b"].detach()
    with layer.router.routing(torch.full((6,), 1), wide=(ids, dense)):
        got = (layer(z) - layer.base(z)).squeeze(1)
    for r in range(6):
        bag = [w[8 + int(i) % 4] for i in ids[r, 1:] if i >= 0]
        want = w[int(ids[r, 0]) % 8] + (sum(bag) / len(bag) if bag else 0.0) + w[12] * dense[r, 1]
        assert torch.allclose(got[r], torch.as_tensor(want), atol=1e-6), r


def test_mixed_domains_equal_separate_passes_and_slot_minus_one_is_the_base():
    layer, (z, ids, dense) = _layer(), _inputs()
    with torch.no_grad():
        for p in layer.wide.values():
            p.normal_()
    slots = torch.tensor([0, 1, -1, 0, 1, 1])
    with layer.router.routing(slots, wide=(ids, dense)):
        mixed = layer(z)
    for k in (-1, 0, 1):
        rows = slots == k
        with layer.router.routing(slots[rows], wide=(ids[rows], dense[rows])):
            assert torch.allclose(layer(z[rows]), mixed[rows], atol=1e-6)
    assert torch.equal(mixed[2], layer.base(z[2:3])[0])


def test_it_refuses_a_forward_without_its_inputs_or_with_the_wrong_width():
    layer, (z, ids, dense) = _layer(), _inputs()
    with layer.router.routing(torch.zeros(6, dtype=torch.long)), pytest.raises(RuntimeError, match="wide inputs"):
        layer(z)
    with layer.router.routing(torch.zeros(6, dtype=torch.long), wide=(ids[:, :2], dense)), \
            pytest.raises(ValueError, match=r"expected \(6, 4\)"):
        layer(z)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(4, 4))
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.tower(x))


def test_inject_wraps_the_output_layer_and_its_state_round_trips_per_domain():
    torch.manual_seed(0)
    model = _Net()
    adapted = inject(model, LoraConfig(alpha=2, wide=["item", "tags", "price"]), ["a", "b"], wide=SPEC)
    assert isinstance(model.out, WideOutput) and list(adapted.layers)[-1] == "out"
    assert adapted.wide == SPEC
    assert adapted.param_count("a") == 4 * 2 + 2 * 4 + 4 + 13  # LoRA A, B, bias + wide [T + M]
    state = adapted.state_for("a")
    assert state["out.wide"].shape == (13,)
    state["out.wide"] += 1.0
    adapted.load_state_for("b", state)
    assert torch.equal(adapted.state_for("b")["out.wide"], state["out.wide"])
    assert torch.equal(adapted.state_for("a")["out.wide"], torch.zeros(13))  # the other domain untouched
    with pytest.raises(ValueError, match="does not fold"):
        adapted.merge("a")


def test_inject_needs_the_spec_that_the_config_names():
    with pytest.raises(ValueError, match="needs a WideSpec"):
        inject(_Net(), LoraConfig(wide=["item"]), ["a"])
    with pytest.raises(ValueError, match="wide_buckets"):
        LoraConfig(wide_buckets=0)
    with pytest.raises(ValueError, match="distinct"):
        LoraConfig(wide=["*", "item"])
