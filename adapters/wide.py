"""Per-domain wide adapters: per-domain effects of single features, added to the logit.

Letters: B rows, K domains, S id slots (the selected sparse features' ids side by side, each
feature's bag padded with -1 to its ``max_len``), T table entries of one domain, N dense
features of the schema, M of them selected.

For a row of domain d, around the frozen output layer ``out``::

    logit = out(h) + sum_f mean_{i in bag_f} W_d[off_f + i mod n_f] + sum_j v_{d,j} dense_j

with n_f = min(buckets, rows of f's table) entries per selected sparse feature f (its hashed id
modulo n_f; T = sum_f n_f) and one slope v_{d,j} per selected dense feature. ``W_d`` and ``v_d``
are one flat vector ``wide`` [T + M] per domain that starts at zero, so the adapted model starts
exactly at the backbone.

Why beside the tower LoRA: a low-rank update of the tower sees an id only through its frozen
embedding, so it can express a per-domain effect of that id only as far as the pretrained
embeddings happen to span it. Real surfaces differ exactly there: which categories and items
they favour, their own hot items, a feature that matters on some surfaces only, a different
price sensitivity. A per-domain width-1 delta on the selected tables (the domain's "embedding
shard"), read at the logit, holds such an effect directly, at T + M scalars per domain, trained
against the frozen sharded tables from ids cached beside their embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mdlora.adapters.lora import DomainModule, Router, domain_key


@dataclass(frozen=True)
class WideSpec:
    """Which features a wide adapter reads and how (built from the schema by the trainer).

    Attributes:
        sparse: ``(feature, entries n_f, bag slots L_f)`` per selected sparse feature.
        dense: ``(feature, column j in the dense block)`` per selected dense feature.
        num_dense: N, the width of the dense block the router passes.
    """

    sparse: tuple[tuple[str, int, int], ...] = ()
    dense: tuple[tuple[str, int], ...] = ()
    num_dense: int = 0

    def __bool__(self) -> bool:
        return bool(self.sparse or self.dense)

    @property
    def slots(self) -> int:
        """S, the id columns of a row (sum of the bag slots)."""
        return sum(length for _, _, length in self.sparse)

    @property
    def entries(self) -> int:
        """T + M, the scalars of one domain."""
        return sum(n for _, n, _ in self.sparse) + len(self.dense)


class WideOutput(DomainModule):
    """The frozen output layer plus each domain's wide term (module docstring).

    Reads the rows' ids [B, S] (int64, -1 = padding) and dense block [B, N] from the router
    (``routing(..., wide=(ids, dense))``).

    Args:
        base: the frozen output layer (``[B, H'] -> [B, 1]``).
        domains: domain names; slot i routes to ``domains[i]``.
        spec: the features read.
        router: the model's shared router.

    Example::

        spec = WideSpec(sparse=(("item", 8, 1),), dense=(("price", 0),), num_dense=1)
        out = WideOutput(nn.Linear(4, 1), ["a", "b"], spec)
        with out.router.routing(torch.tensor([0, 1]), wide=(torch.tensor([[3], [-1]]), torch.ones(2, 1))):
            logit = out(torch.randn(2, 4))  # [2, 1]; equals the base output until trained
    """

    DOMAIN_PARTS = {"wide": "wide"}

    def __init__(self, base: nn.Module, domains: list[str], spec: WideSpec, router: Router | None = None) -> None:
        super().__init__(base, router)
        if not spec:
            raise ValueError("spec: a wide adapter needs at least one feature")
        self.spec = spec
        sizes = [n for _, n, length in spec.sparse for _ in range(length)]
        starts = torch.tensor([0] + [n for _, n, _ in spec.sparse]).cumsum(0)[:-1].tolist()
        self.register_buffer("size", torch.tensor(sizes, dtype=torch.long), persistent=False)  # [S]
        self.register_buffer("offset", torch.tensor(  # [S] start of the slot's feature in W_d
            [s for s, (_, _, length) in zip(starts, spec.sparse, strict=True) for _ in range(length)],
            dtype=torch.long), persistent=False)
        self.register_buffer("feature", torch.tensor(  # [S] the slot's feature
            [f for f, (_, _, length) in enumerate(spec.sparse) for _ in range(length)], dtype=torch.long),
            persistent=False)
        self.register_buffer("dense_cols", torch.tensor([j for _, j in spec.dense], dtype=torch.long),
                             persistent=False)
        self.tables = sum(n for _, n, _ in spec.sparse)  # T
        self.wide = nn.ParameterDict()
        for name in domains:
            self.add_domain(name)

    def _new_domain(self, key: str, device: torch.device, dtype: torch.dtype) -> None:
        self.wide[key] = nn.Parameter(torch.zeros(self.spec.entries, device=device, dtype=dtype))

    def _inputs(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """The routed slots [B], table indices [B, S], their weights [B, S] (a bag's mean) and
        the selected dense values [B, M], checked."""
        r = self.router
        if r.domain is None:
            raise RuntimeError("no routing set: run the forward in `with adapted.routing(slots, wide=...)`")
        if r.wide is None:
            raise RuntimeError("no wide inputs in the routing: pass routing(..., wide=(ids, dense))")
        ids, dense = r.wide
        if ids.shape != (rows, self.spec.slots) or dense.shape != (rows, self.spec.num_dense):
            raise ValueError(f"wide inputs: ids {tuple(ids.shape)} and dense {tuple(dense.shape)}, expected "
                             f"({rows}, {self.spec.slots}) and ({rows}, {self.spec.num_dense})")
        if r.domain.top >= len(self.domains):
            raise ValueError(f"domain_slots: slot {r.domain.top} out of range for {self.domains}")
        valid = ids >= 0
        index = self.offset + ids.clamp(min=0) % self.size  # [B, S]
        count = torch.zeros(rows, len(self.spec.sparse), dtype=dense.dtype, device=ids.device)
        count.index_add_(1, self.feature, valid.to(dense.dtype))
        weight = valid.to(dense.dtype) / count[:, self.feature].clamp(min=1)  # [B, S]
        return index, weight, dense[:, self.dense_cols]

    def forward(self, z: Tensor) -> Tensor:
        """[B, H'] -> logits [B, 1]: the base output plus each row's domain term (0 for slot -1)."""
        y = self.base(z)
        index, weight, dense = self._inputs(z.shape[0])
        route = self.router.domain
        if route.single is not None:
            if route.single < 0:
                return y
            w = self.wide[domain_key(self.domains[route.single])]  # [T + M]
            term = (w[index] * weight).sum(1) + dense @ w[self.tables:]
        else:
            stacked = self.stacked("wide", lambda: torch.stack([self.wide[domain_key(d)] for d in self.domains]))
            slot = route.slots.clamp(min=0).unsqueeze(1)  # [B, 1]
            term = (stacked[slot, index] * weight).sum(1) + (stacked[slot, self.tables + torch.arange(
                dense.shape[1], device=dense.device)] * dense).sum(1)
            term = term * (route.slots >= 0).to(term.dtype)
        return y + term.unsqueeze(1)

    def merged_linear(self, domain: str, *, safe: bool = True) -> nn.Linear:
        """Not defined: the wide term reads ids, which no Linear of ``h`` does."""
        raise ValueError("merge: a wide adapter does not fold into a Linear (it reads the rows' ids)")
