"""Shared-Bottom, MMoE, STAR heads and DomainCTRTask: shapes, routing, STAR math, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdlora.embeddings.schema import Schema
from mdlora.trainer.baselines import (
    STAR,
    DomainCTRTask,
    MMoE,
    PartitionedNorm,
    SharedBottom,
    StarLinear,
)
from mdlora.trainer.config import ModelConfig
from tests.trainer.test_backbone import build, make_batch

E, K = 12, 3
HEADS = {
    "shared_bottom": lambda: SharedBottom(E, [16, 8], K),
    "mmoe": lambda: MMoE(E, [16, 8], K, num_experts=3),
    "star": lambda: STAR(E, [16, 8], K, aux_hidden=[6]),
    "star_no_aux": lambda: STAR(E, [16, 8], K),
}


def _inputs(rows: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, E, generator=g)
    domains = torch.arange(rows) % K  # every domain present, interleaved
    return x, domains[torch.randperm(rows, generator=g)]


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Perturb every parameter, so domain-specific parts differ from their (equal) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", sorted(HEADS))
class TestHeads:
    def test_shape_and_seed_determinism(self, name):
        x, d = _inputs()
        torch.manual_seed(0)
        a = HEADS[name]()
        torch.manual_seed(0)
        b = HEADS[name]()
        assert a(x, d).shape == (24,) and torch.equal(a(x, d), b(x, d))

    @pytest.mark.parametrize("training", [False, True])
    def test_mixed_batch_equals_per_domain_passes(self, name, training):
        torch.manual_seed(0)
        head = HEADS[name]()
        _randomise(head)
        head.train(training)
        x, d = _inputs()
        mixed = head(x, d)
        for k in range(K):
            rows = d == k
            torch.testing.assert_close(mixed[rows], head(x[rows], d[rows]))

    def test_domains_are_routed(self, name):
        torch.manual_seed(0)
        head = HEADS[name]().eval()
        _randomise(head)
        x, _ = _inputs()
        outs = [head(x, torch.full((24,), k)) for k in range(K)]
        assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])

    def test_every_parameter_gets_a_gradient(self, name):
        torch.manual_seed(0)
        head = HEADS[name]()
        x, d = _inputs()
        F.binary_cross_entropy_with_logits(head(x, d), (x[:, 0] > 0).float()).backward()
        missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing

    def test_bad_domain_id_is_rejected(self, name):
        x, d = _inputs()
        with pytest.raises(ValueError, match=r"domains: ids must lie in \[0, 3\)"):
            HEADS[name]()(x, torch.where(d == 2, 3, d))


def test_tower_of_one_domain_leaves_the_others_unchanged():
    torch.manual_seed(0)
    head = SharedBottom(E, [16, 8], K).eval()
    x, d = _inputs()
    before = head(x, d)
    with torch.no_grad():
        for p in head.towers.mlp[1].parameters():
            p.add_(1.0)
    after = head(x, d)
    assert torch.equal(after[d != 1], before[d != 1])
    assert not torch.allclose(after[d == 1], before[d == 1])


def test_mmoe_gate_is_a_per_domain_softmax():
    torch.manual_seed(0)
    head = MMoE(E, [16, 8], K, num_experts=4)
    x, d = _inputs()
    g = head.gate(x, d)
    assert g.shape == (24, 4) and (g > 0).all()
    torch.testing.assert_close(g.sum(1), torch.ones(24))
    manual = torch.softmax((x @ head.gates.weight.T + head.gates.bias).view(24, K, 4), 2)
    torch.testing.assert_close(g, manual[torch.arange(24), d])


def test_star_linear_composes_shared_and_domain_weights():
    torch.manual_seed(0)
    layer = StarLinear(E, 5, K)
    x, d = _inputs()
    torch.testing.assert_close(layer(x, d), layer.shared(x))  # W_k = 1, b_k = 0: the shared layer
    _randomise(layer)
    out = layer(x, d)
    for k in range(K):
        w = layer.shared.weight * layer.weight_k[k]
        b = layer.shared.bias + layer.bias_k[k]
        torch.testing.assert_close(out[d == k], x[d == k] @ w.T + b)


def test_partitioned_norm_uses_each_domains_statistics():
    norm = PartitionedNorm(E, K)
    x, d = _inputs(rows=60)
    x = x + 5.0 * d.unsqueeze(1)  # domains differ in mean
    y = norm(x, d)
    for k in range(K):
        rows = y[d == k]
        torch.testing.assert_close(rows.mean(0), torch.zeros(E), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.var(0, unbiased=False), torch.ones(E), atol=1e-3, rtol=0)
        torch.testing.assert_close(norm.running_mean[k], 0.1 * x[d == k].mean(0))
    with torch.no_grad():
        norm.gamma_k[1].fill_(2.0)
        norm.beta_k[1].fill_(0.5)
    norm.eval()
    ref = (x - norm.running_mean[d]) / torch.sqrt(norm.running_var[d] + 1e-5)
    scale = torch.where((d == 1).unsqueeze(1), 2.0, 1.0)
    shift = torch.where((d == 1).unsqueeze(1), 0.5, 0.0)
    torch.testing.assert_close(norm(x, d), ref * scale + shift)


def test_single_row_domain_uses_running_statistics_in_training():
    norm = PartitionedNorm(E, K)
    x, _ = _inputs(rows=5)
    d = torch.tensor([0, 0, 0, 0, 2])
    y = norm(x, d)  # no error on a one-row domain; it is normalised by the running stats
    torch.testing.assert_close(y[4], x[4] / torch.sqrt(torch.tensor(1 + 1e-5)))
    torch.testing.assert_close(norm.running_mean[2], torch.zeros(E))


@pytest.fixture
def schema(tiny_schema_dict) -> Schema:
    return Schema.from_dict(tiny_schema_dict)


def test_domain_task_trains_embeddings_and_head_only(schema):
    backbone = build(schema, ModelConfig(hidden=[8]))
    task = DomainCTRTask(backbone, STAR(backbone.input_dim, [16, 8], 3, aux_hidden=[4]))
    batch = make_batch(schema, 32, torch.Generator().manual_seed(0))
    loss, (loss_d, logits, labels) = task(batch)
    x = backbone.embed(batch.sparse, batch.dense)
    torch.testing.assert_close(logits, task.head(x, batch.domains).detach())
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, labels))
    loss.backward()
    trainable = {id(p) for p in task.trainable_parameters()}
    for n, p in task.named_parameters():
        if n.startswith(("backbone.tower", "backbone.out")):
            assert id(p) not in trainable and p.grad is None, n
        else:
            assert id(p) in trainable and p.grad is not None, n
    assert any(n.startswith("backbone.embeddings") for n, _ in task.named_parameters())


def test_domain_task_learns(schema):
    """A few Adam steps on a fixed batch lower the loss (the whole path is differentiable)."""
    backbone = build(schema, ModelConfig(hidden=[8]))
    task = DomainCTRTask(backbone, MMoE(backbone.input_dim, [16, 8], 3))
    batch = make_batch(schema, 64, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(task.trainable_parameters(), lr=1e-2)
    first = task(batch)[0].item()
    for _ in range(30):
        opt.zero_grad()
        task(batch)[0].backward()
        opt.step()
    assert task(batch)[0].item() < 0.7 * first
