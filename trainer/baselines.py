"""Multi-domain baselines that are not LoRA: Shared-Bottom, MMoE and STAR. Pure model math.

Letters: B batch rows, E width of the embedding-layer output ``x`` (:meth:`Backbone.embed`),
K domains, H_1 the first hidden width (``hidden[0]``), M experts.

Every baseline is a *head* ``logits = head(x, domains)`` over the same embedding layer as the
backbone, so the comparison with Mix / MLoRA isolates the multi-domain part. With
``hidden = [256, 128]`` (the backbone's tower):

- :class:`SharedBottom` (Caruana 1997): shared ``bottom = MLP(E, [H_1])``; per domain a tower
  ``MLP(H_1, hidden[1:])`` and ``Linear(., 1)``.
- :class:`MMoE` (Ma et al. 2018): M experts ``MLP(E, [H_1])``; per domain a gate
  ``g_k(x) = softmax(G_k x)`` [M] and a tower as above over ``sum_m g_k(x)_m e_m(x)``.
- :class:`STAR` (Sheng et al. 2021): partitioned normalisation of ``x``, then a star-topology
  FCN whose layer l for domain k uses ``W = W_shared ⊙ W_k``, ``b = b_shared + b_k``
  (W_k = 1, b_k = 0 at init, so every domain starts as the shared network), plus an optional
  auxiliary network ``MLP([x, e_k])`` (e_k a domain embedding) whose logit is added.

:class:`DomainCTRTask` puts a head on a backbone's embedding layer and has the
:class:`~mdlora.trainer.task.CTRTask` interface (``task(batch) -> (loss, (loss, logits, labels))``), so
``mdlora.trainer.loop.train``/``evaluate`` run it unchanged. Rows are routed by ``batch.domains``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlora.embeddings.batch import Batch
from mdlora.trainer.backbone import MLP, Backbone, _init_linear


def _by_domain(domains: Tensor, k: int) -> list[tuple[int, Tensor]]:
    """``(domain id, row indices)`` of every domain in [0, K) present in ``domains`` [B]."""
    if domains.numel() and (int(domains.min()) < 0 or int(domains.max()) >= k):
        raise ValueError(f"domains: ids must lie in [0, {k}), got {domains.unique().tolist()}")
    return [(int(d), torch.nonzero(domains == d).squeeze(1)) for d in domains.unique()]


def _init(module: nn.Module) -> None:
    """The backbone's init rule (Xavier-uniform, zero bias) on every Linear of ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _init_linear(m)


class _Towers(nn.Module):
    """One ``MLP(in, hidden) -> Linear(., 1)`` tower per domain; rows routed by domain id."""

    def __init__(self, in_features: int, hidden: list[int], num_domains: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.ModuleList(MLP(in_features, hidden, dropout) for _ in range(num_domains))
        width = hidden[-1] if hidden else in_features
        self.out = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_domains))

    def forward(self, h: Tensor, domains: Tensor) -> Tensor:
        """[B, in] rows, [B] domain ids -> logits [B] (row i through tower ``domains[i]``)."""
        logits = h.new_zeros(h.shape[0])
        for d, rows in _by_domain(domains, len(self.out)):
            logits = logits.index_put((rows,), self.out[d](self.mlp[d](h[rows])).squeeze(1))
        return logits


class SharedBottom(nn.Module):
    """Shared bottom MLP, one tower per domain.

    Args:
        in_features: E.
        hidden: ``[H_1, *tower]``: the bottom width, then each tower's hidden widths.
        num_domains: K.
        dropout: dropout after each hidden layer.

    Example::

        head = SharedBottom(112, [256, 128], num_domains=3)
        logits = head(torch.randn(4, 112), torch.tensor([0, 2, 2, 1]))  # [4]
    """

    def __init__(self, in_features: int, hidden: list[int], num_domains: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden or num_domains < 1:
            raise ValueError(f"hidden {hidden} / num_domains {num_domains}: need >= 1 of each")
        self.bottom = MLP(in_features, hidden[:1], dropout)
        self.towers = _Towers(hidden[0], hidden[1:], num_domains, dropout)
        _init(self)

    def forward(self, x: Tensor, domains: Tensor) -> Tensor:
        """[B, E], [B] -> logits [B]."""
        return self.towers(self.bottom(x), domains)


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, one softmax gate and tower per domain.

    ``z = sum_m softmax(G_k x)_m e_m(x)`` [B, H_1] for a row of domain k, then tower k.

    Args:
        in_features: E.
        hidden: ``[H_1, *tower]``: each expert's width, then each tower's hidden widths.
        num_domains: K.
        num_experts: M.
        dropout: dropout after each hidden layer.

    Example::

        head = MMoE(112, [256, 128], num_domains=3, num_experts=4)
        logits = head(torch.randn(4, 112), torch.tensor([0, 2, 2, 1]))  # [4]
    """

    def __init__(self, in_features: int, hidden: list[int], num_domains: int, num_experts: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden or num_domains < 1 or num_experts < 1:
            raise ValueError(f"hidden {hidden} / num_domains {num_domains} / num_experts "
                             f"{num_experts}: need >= 1 of each")
        self.num_domains, self.num_experts = num_domains, num_experts
        self.experts = nn.ModuleList(MLP(in_features, hidden[:1], dropout) for _ in range(num_experts))
        self.gates = nn.Linear(in_features, num_domains * num_experts)  # K gates G_k [M, E], stacked
        self.towers = _Towers(hidden[0], hidden[1:], num_domains, dropout)
        _init(self)

    def gate(self, x: Tensor, domains: Tensor) -> Tensor:
        """Each row's own domain gate ``softmax(G_k x)``: [B, E], [B] -> [B, M]."""
        _by_domain(domains, self.num_domains)  # checks the ids
        all_gates = self.gates(x).view(-1, self.num_domains, self.num_experts)  # [B, K, M]
        return torch.softmax(all_gates[torch.arange(x.shape[0]), domains], dim=1)

    def forward(self, x: Tensor, domains: Tensor) -> Tensor:
        """[B, E], [B] -> logits [B]."""
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, M, H_1]
        z = (self.gate(x, domains).unsqueeze(2) * experts).sum(1)  # [B, H_1]
        return self.towers(z, domains)


class PartitionedNorm(nn.Module):
    """STAR's partitioned normalisation: per-domain statistics, shared × domain affine.

    ``y = (γ ⊙ γ_k) ⊙ (x - μ_k) / sqrt(σ²_k + eps) + (β + β_k)`` for a row of domain k, with
    μ_k, σ²_k the batch statistics of domain k's rows in training (running averages in eval, and
    for a domain with a single row in the batch).

    Args:
        num_features: E.
        num_domains: K.
        momentum: running-statistics momentum (as ``nn.BatchNorm1d``).
        eps: variance epsilon.
    """

    def __init__(self, num_features: int, num_domains: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma, self.beta = nn.Parameter(torch.ones(num_features)), nn.Parameter(torch.zeros(num_features))
        self.gamma_k = nn.Parameter(torch.ones(num_domains, num_features))
        self.beta_k = nn.Parameter(torch.zeros(num_domains, num_features))
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))

    def forward(self, x: Tensor, domains: Tensor) -> Tensor:
        """[B, E], [B] -> [B, E]."""
        out = x.new_zeros(x.shape)
        for d, rows in _by_domain(domains, self.gamma_k.shape[0]):
            batch_stats = self.training and len(rows) > 1
            y = F.batch_norm(x[rows], self.running_mean[d], self.running_var[d],
                             self.gamma * self.gamma_k[d], self.beta + self.beta_k[d],
                             training=batch_stats, momentum=self.momentum, eps=self.eps)
            out = out.index_put((rows,), y)
        return out


class StarLinear(nn.Module):
    """Star-topology linear layer: domain k uses ``W_shared ⊙ W_k`` and ``b_shared + b_k``.

    Args:
        in_features: input width.
        out_features: output width.
        num_domains: K.
    """

    def __init__(self, in_features: int, out_features: int, num_domains: int) -> None:
        super().__init__()
        self.shared = nn.Linear(in_features, out_features)
        _init_linear(self.shared)
        self.weight_k = nn.Parameter(torch.ones(num_domains, out_features, in_features))
        self.bias_k = nn.Parameter(torch.zeros(num_domains, out_features))

    def weight(self, d: int) -> tuple[Tensor, Tensor]:
        """Domain ``d``'s composed ``(W [out, in], b [out])``."""
        return self.shared.weight * self.weight_k[d], self.shared.bias + self.bias_k[d]

    def forward(self, x: Tensor, domains: Tensor) -> Tensor:
        """[B, in], [B] -> [B, out]."""
        out = x.new_zeros(x.shape[0], self.shared.out_features)
        for d, rows in _by_domain(domains, self.weight_k.shape[0]):
            out = out.index_put((rows,), F.linear(x[rows], *self.weight(d)))
        return out


class STAR(nn.Module):
    """STAR: partitioned normalisation, star-topology FCN, optional auxiliary network.

    ``logit = fcn_k(PN_k(x)) + aux([x, e_k])`` with fcn_k ReLU-stacked :class:`StarLinear`
    layers of widths ``[*hidden, 1]`` and aux ``MLP(E + aux_dim, aux_hidden) -> Linear(., 1)``.

    Args:
        in_features: E.
        hidden: hidden widths of the star FCN.
        num_domains: K.
        aux_hidden: hidden widths of the auxiliary network; None: no auxiliary network.
        aux_dim: width of the domain embedding e_k fed to the auxiliary network.
        dropout: dropout after each hidden layer.

    Example::

        head = STAR(112, [256, 128], num_domains=3)
        logits = head(torch.randn(4, 112), torch.tensor([0, 2, 2, 1]))  # [4]
    """

    def __init__(self, in_features: int, hidden: list[int], num_domains: int,
                 aux_hidden: list[int] | None = None, aux_dim: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden or num_domains < 1:
            raise ValueError(f"hidden {hidden} / num_domains {num_domains}: need >= 1 of each")
        widths = [in_features, *hidden, 1]
        self.dropout = dropout
        self.norm = PartitionedNorm(in_features, num_domains)
        self.layers = nn.ModuleList(StarLinear(a, b, num_domains)
                                    for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.aux = None
        if aux_hidden is not None:
            self.domain_embedding = nn.Embedding(num_domains, aux_dim)
            self.aux = nn.Sequential(MLP(in_features + aux_dim, aux_hidden, dropout),
                                     nn.Linear(aux_hidden[-1] if aux_hidden else in_features + aux_dim, 1))
            _init(self.aux)

    def forward(self, x: Tensor, domains: Tensor) -> Tensor:
        """[B, E], [B] -> logits [B]."""
        h = self.norm(x, domains)
        for i, layer in enumerate(self.layers):
            h = layer(h, domains)
            if i < len(self.layers) - 1:
                h = F.dropout(F.relu(h), self.dropout, self.training)
        logits = h.squeeze(1)
        if self.aux is not None:
            logits = logits + self.aux(torch.cat([x, self.domain_embedding(domains)], 1)).squeeze(1)
        return logits


class DomainCTRTask(nn.Module):
    """Mean BCE of a multi-domain head on a backbone's embedding layer (``CTRTask`` interface).

    ``logits = head(backbone.embed(sparse, dense), domains)``. Only the embedding layer of
    ``backbone`` is used: its tower and output layer are frozen here and never run, so
    :meth:`trainable_parameters` (embeddings + head) is what an optimiser should get.

    Args:
        backbone: supplies ``embed`` (same embedding module and ``x`` layout as Mix).
        head: ``head(x [B, E], domains [B]) -> logits [B]`` (:class:`SharedBottom`,
            :class:`MMoE`, :class:`STAR`).

    Example::

        task = DomainCTRTask(build_backbone(schema, cfg, build_ebc(schema, "cpu")),
                             STAR(schema.pooled_dim(), [256, 128], num_domains=3))
        loss, (loss_d, logits, labels) = task(batch)
    """

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        backbone.tower.requires_grad_(False)
        backbone.out.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that take part in the forward pass: embeddings and the head."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: Batch) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``(loss, (loss.detach(), logits.detach(), labels))`` of a batch of B rows."""
        logits = self.head(self.backbone.embed(batch.sparse, batch.dense), batch.domains)  # [B]
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)
