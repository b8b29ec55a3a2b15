"""MultiLoRA layer: domain and aux-value LoRAs, attention fusion, per-combined-domain BN.

Letters and routing as in :mod:`mdlora.adapters.lora`. For a row x of domain d and aux value a::

    h   = x W^T + b_W                                       frozen output, the fusion query
    u_d = scaling · s_d ⊙ (U_d D_d x) + b_d                 D [r, d_in], s [d_out] Gaussian;
    u_a = the same form with aux-value parameters           U [d_out, r], b [d_out] zero
    w   = softmax_j (Q_d h)·(K_d u_j) / sqrt(f),  j ∈ {d, a}     Q_d, K_d: Linear d_out -> f
    z   = h + w_d u_d + w_a u_a
    y   = z + γ_{d,a} ⊙ (z - μ_{d,a}) / sqrt(σ²_{d,a} + eps) + β_{d,a}     BN per combined domain

``fusion="add"`` uses h + u_d + u_a, ``"avg"`` h + (u_d + u_a) / 2.

Neutral start: U = b = 0, so u_d = u_a = 0; Q_d = 0, so the fusion weights start at 1/2 each
(the ``avg`` fusion; Q_d gets a gradient as soon as the updates move, as a LoRA zero factor
does); the combined-domain BN (``domain_bn``) is residual with γ = β = 0. The adapted layer
therefore starts exactly at the frozen layer, y = h, in train and eval mode. A plain BN after
a frozen layer of a backbone trained without one would standardise h and move every frozen
layer above it off its pretrained input; the residual form keeps BN's per-domain scale and
shift of normalised activations (y = z (1 + γ/σ) + β - γ μ/σ) without that jump. Ownership: u_d, Q_d, K_d and BN_{d,·} belong to domain d (its
bundle; adding a domain leaves the others untouched); u_a is shared by all domains, one per aux
value (:meth:`MultiLoRALinear.aux_lora` state). The fusion projections are per domain rather
than per layer: a shared projection would be retrained with every new domain and change the
scores of the domains already deployed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mdlora.adapters.lora import Route, RoutedLoRA, Router, _AdaptedLinear, _onehot, domain_key


class MultiLoRALinear(_AdaptedLinear):
    """MultiLoRA layer: domain + aux LoRAs, fusion and per-combined-domain BN (module docstring).

    Args:
        base: the pretrained ``nn.Linear`` (frozen in place).
        domains: domain names (slot order).
        aux_values: values of the auxiliary division (aux slot order).
        rank: r of both LoRA sets.
        scaling: factor on the low-rank products.
        fusion: ``attention``, ``add`` or ``avg``.
        fusion_dim: f.
        domain_bn: BatchNorm1d per (domain, aux value) after the adapted layer.
        router: the model's shared :class:`Router`.
    """

    DOMAIN_PARTS = {
        "lora.D": "D",
        "lora.U": "U",
        "lora.s": "s",
        "lora.b": "b",
        "fusion_q": "fusion_q",
        "fusion_k": "fusion_k",
        "bn": "bn",
    }

    def __init__(
        self,
        base: nn.Linear,
        domains: list[str],
        aux_values: list[str],
        rank: int,
        *,
        scaling: float = 1.0,
        fusion: str = "attention",
        fusion_dim: int = 16,
        domain_bn: bool = True,
        router: Router | None = None,
    ) -> None:
        super().__init__(base, router)
        if not aux_values:
            raise ValueError("aux_values: MultiLoRA needs at least one aux value")
        if fusion not in ("attention", "add", "avg"):
            raise ValueError(f"fusion: must be attention, add or avg, got {fusion!r}")
        d_in, d_out = base.in_features, base.out_features
        self.aux_values, self.fusion = list(aux_values), fusion
        self.fusion_dim, self.domain_bn = fusion_dim, domain_bn
        self.lora = RoutedLoRA(d_in, d_out, rank, style="multilora", scaling=scaling)
        self.aux_lora = RoutedLoRA(d_in, d_out, rank, style="multilora", scaling=scaling)
        for a in self.aux_values:
            self.aux_lora.add(domain_key(a), base.weight.device, base.weight.dtype)
        self.fusion_q, self.fusion_k, self.bn = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for name in domains:
            self.add_domain(name)

    def _new_domain(self, key: str, device: torch.device, dtype: torch.dtype) -> None:
        self.lora.add(key, device, dtype)
        kw = {"device": device, "dtype": dtype}
        if self.fusion == "attention":
            for proj in (self.fusion_q, self.fusion_k):
                proj[key] = nn.Linear(self.base.out_features, self.fusion_dim, bias=False, **kw)
            nn.init.zeros_(self.fusion_q[key].weight)  # equal fusion weights at init
        if self.domain_bn:
            self.bn[key] = nn.ModuleDict(
                {
                    domain_key(a): nn.BatchNorm1d(self.base.out_features, **kw)
                    for a in self.aux_values
                }
            )
            for bn in self.bn[key].values():
                nn.init.zeros_(bn.weight)  # residual BN: the identity at init

    def forward(self, x: Tensor) -> Tensor:
        """y [B, *, d_out], routed by the router's domain and aux slots; rows of slot -1 get base(x)."""
        flat, (dom, aux) = self._flat(x, self.aux_values)
        h = self.base(flat)  # [N, d_out]
        if dom.single == -1:
            return h.view(*x.shape[:-1], -1)
        u_d, u_a = self.lora(flat, dom), self.aux_lora(flat, aux)  # [N, d_out] each
        if self.fusion == "add":
            y = h + u_d + u_a
        elif self.fusion == "avg":
            y = h + (u_d + u_a) / 2
        else:
            w = self._attend(h, u_d, u_a, dom)  # [N, 2]
            y = h + w[:, :1] * u_d + w[:, 1:] * u_a
        if self.domain_bn:
            y = self._batch_norm(
                y, torch.where(dom.slots >= 0, dom.slots * len(self.aux_values) + aux.slots, -1)
            )
        if dom.single is None:
            y = torch.where((dom.slots >= 0).unsqueeze(1), y, h)
        return y.view(*x.shape[:-1], -1)

    def _attend(self, h: Tensor, u_d: Tensor, u_a: Tensor, dom: Route) -> Tensor:
        """Softmax weights [N, 2] of the domain and aux updates for query h (per-domain Q, K)."""
        keys = self.lora.keys
        if dom.single is not None:
            key = keys[dom.single]
            q_proj, k_proj = self.fusion_q[key].weight, self.fusion_k[key].weight
            pick = lambda z: z  # noqa: E731
        else:  # every domain's projection, then each row's own: [N, K f] -> [N, f]
            q_proj, k_proj = self.stacked(
                "fusion",
                lambda: (
                    torch.cat([self.fusion_q[k].weight for k in keys]),
                    torch.cat([self.fusion_k[k].weight for k in keys]),
                ),
            )
            onehot = _onehot(dom.slots, len(keys), h.dtype).unsqueeze(-1)  # [N, K, 1]
            pick = lambda z: (z.view(z.shape[0], len(keys), -1) * onehot).sum(1)  # noqa: E731
        q = pick(h @ q_proj.T)  # [N, f]
        scores = torch.stack([(q * pick(u @ k_proj.T)).sum(-1) for u in (u_d, u_a)], -1)  # [N, 2]
        return torch.softmax(scores / math.sqrt(self.fusion_dim), dim=-1)

    def _batch_norm(self, y: Tensor, groups: Tensor) -> Tensor:
        """Residual BN of each row's combined domain: y + BN(y) (groups [N], -1: untouched rows).

        BN(y) = γ ⊙ (y - μ) / sqrt(σ² + eps) + β with γ = β = 0 at init. Training: per-group batch statistics (biased variance), running statistics updated with
        the BN's momentum (unbiased variance), as ``nn.BatchNorm1d`` does on each group alone; a
        group with a single row in the batch uses its running statistics. Eval: running statistics.
        """
        bns = [self.bn[d][domain_key(a)] for d in self.lora.keys for a in self.aux_values]
        weight, bias, mean_r, var_r = self.stacked(
            "bn",
            lambda: tuple(
                torch.stack([getattr(bn, n) for bn in bns])
                for n in ("weight", "bias", "running_mean", "running_var")
            ),
        )
        onehot = _onehot(groups, len(bns), y.dtype)  # [N, G]
        if self.training:
            n = onehot.sum(0).unsqueeze(1)  # [G, 1]
            mean = onehot.T @ y / n.clamp(min=1)  # [G, d_out]
            var = onehot.T @ (y - onehot @ mean) ** 2 / n.clamp(min=1)
            ok = n >= 2
            with torch.no_grad():
                m = bns[0].momentum
                new_mean = torch.where(ok, torch.lerp(mean_r, mean, m), mean_r)
                new_var = torch.where(
                    ok, torch.lerp(var_r, var * n / (n - 1).clamp(min=1), m), var_r
                )
                for bn, nm, nv, seen in zip(bns, new_mean, new_var, ok, strict=True):
                    bn.running_mean.copy_(nm)
                    bn.running_var.copy_(nv)
                    bn.num_batches_tracked.add_(seen[0].long())
            mean, var = torch.where(ok, mean, mean_r), torch.where(ok, var, var_r)
        else:
            mean, var = mean_r, var_r
        normed = (y - onehot @ mean) * torch.rsqrt(onehot @ var + bns[0].eps)
        return y + normed * (onehot @ weight) + onehot @ bias
