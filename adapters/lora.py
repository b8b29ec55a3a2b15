"""Per-domain LoRA layers over the frozen Linear layers of a multi-domain CTR tower.

Letters: B batch rows, K domains, A aux values, r rank, f fusion dim, d_in/d_out the sizes of
the wrapped ``nn.Linear`` (frozen weight W [d_out, d_in], bias b_W [d_out]).

MLoRA (arXiv 2408.08913), :class:`DomainLoRALinear`, for a row x of domain d::

    y = x W^T + b_W + scaling · (x A_d) B_d + b_d        A_d [d_in, r], B_d [r, d_out], b_d [d_out]

One of A_d/B_d starts kaiming-uniform (as PEFT's ``lora_A``), the other and b_d start at zero:
the update is exactly zero at init and the zero factor still gets a gradient
(dL/dB_d = (x A_d)^T g when B_d = 0), so both factors train from the first steps.

The MultiLoRA layer (:mod:`mdlora.adapters.multilora`) builds on the same routed low-rank sets.

Routing. Rows carry a slot, the index of their domain in the layer's ``domains`` (-1: no
adapter, base output only). Slots reach layers nested anywhere in a tower through a shared
:class:`Router` set once per forward, so the tower's forward is unchanged (PEFT threads
``adapter_names`` through forward kwargs, which needs the tower's cooperation). The router is
plain mutable state: one forward at a time per model instance (one copy per scoring thread).

Mixed-domain batches run in one pass: the K domains' factors are concatenated along the rank
axis and masked per row::

    u = ((x A_cat) ⊙ M) B_cat     A_cat [d_in, K r], B_cat [K r, d_out], M[b, k r:(k+1) r] = [d_b = k]

which equals (x_b A_{d_b}) B_{d_b} row by row: two dense GEMMs with inner size K r instead of
gathering a [B, d_in, r] weight per row for ``torch.bmm`` (far less memory traffic while K r
is small against B). A batch of one domain takes the plain two-matmul path. In no-grad eval
the concatenated view is cached until a parameter changes (``_version``) or ``train()`` runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def domain_key(name: str) -> str:
    """Container key of a domain or aux value ('%' and '.' escaped: module keys hold no '.')."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"domain name {name!r}: must be a non-empty string")
    return name.replace("%", "%25").replace(".", "%2E")


def _onehot(slots: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """[N] slots -> [N, k] one-hot; rows with slot -1 are all zero."""
    return (slots.unsqueeze(1) == torch.arange(k, device=slots.device)).to(dtype)


@dataclass(frozen=True)
class Route:
    """The slots of one division for one forward, checked once.

    Attributes:
        slots: [B] int64 slots, -1 = no adapter.
        single: the slot every row shares (fast path), else None.
        top: the largest slot, checked against each layer's K without a device sync.
    """

    slots: Tensor
    single: int | None
    top: int

    @classmethod
    def of(cls, slots: Tensor, what: str, fast_path: bool = True) -> Route:
        """Check a [B] integer slot tensor (one device sync) and summarise it."""
        if not isinstance(slots, Tensor) or slots.dim() != 1 or slots.is_floating_point():
            got = tuple(slots.shape) if isinstance(slots, Tensor) else type(slots).__name__
            raise ValueError(f"{what}: expected an integer tensor [B], got {got}")
        if slots.numel() == 0:
            return cls(slots.long(), -1 if fast_path else None, -1)
        lo, hi = torch.stack(torch.aminmax(slots)).tolist()
        if lo < -1:
            raise ValueError(f"{what}: slot {lo} is out of range (-1 means no adapter)")
        return cls(slots.long(), lo if lo == hi and fast_path else None, hi)

    def repeat(self, n: int) -> Route:
        """The route of an input [B, n, d_in] flattened to [B n, d_in]."""
        return self if n == 1 else Route(self.slots.repeat_interleave(n), self.single, self.top)


class Router:
    """Per-row domain (and aux) slots shared by every adapted layer of one model.

    Args:
        fast_path: let single-domain batches skip the other domains' factors. Set False under
            DDP, where every rank must touch every trainable parameter in each step.
    """

    def __init__(self, fast_path: bool = True) -> None:
        self.fast_path = fast_path
        self.domain: Route | None = None
        self.aux: Route | None = None
        self.wide: tuple[Tensor, Tensor] | None = None

    def set(self, domain_slots: Tensor, aux_slots: Tensor | None = None,
            wide: tuple[Tensor, Tensor] | None = None) -> None:
        """Route the next forward(s): ``domain_slots`` [B] (and ``aux_slots`` [B] for MultiLoRA;
        ``wide``: the rows' ids [B, S] and dense block [B, N] for a wide adapter)."""
        domain = Route.of(domain_slots, "domain_slots", self.fast_path)
        aux = None if aux_slots is None else Route.of(aux_slots, "aux_slots", self.fast_path)
        if aux is not None and aux.slots.shape != domain.slots.shape:
            raise ValueError(
                f"aux_slots: {aux.slots.shape} rows != domain_slots {domain.slots.shape}"
            )
        if aux is not None and bool(((aux.slots < 0) & (domain.slots >= 0)).any()):
            raise ValueError("aux_slots: -1 on a row with a domain adapter (MultiLoRA needs it)")
        self.domain, self.aux, self.wide = domain, aux, wide

    def clear(self) -> None:
        """Forget the slots (a forward without routing then fails loudly)."""
        self.domain = self.aux = self.wide = None

    @contextmanager
    def routing(self, domain_slots: Tensor, aux_slots: Tensor | None = None,
                wide: tuple[Tensor, Tensor] | None = None) -> Iterator[None]:
        """``with router.routing(slots): model(...)`` sets the slots and clears them afterwards."""
        self.set(domain_slots, aux_slots, wide)
        try:
            yield
        finally:
            self.clear()


class _Cached(nn.Module):
    """A module with derived tensors (stacked views) reused in no-grad eval."""

    def __init__(self) -> None:
        super().__init__()
        self._stacks: dict[str, tuple[tuple, object]] = {}

    def stacked(self, name: str, build: Callable[[], object]) -> object:
        """``build()`` when training or with grad enabled; else cached while tensors are unchanged."""
        if self.training or torch.is_grad_enabled():
            return build()
        key = tuple(
            (t.data_ptr(), t._version) for t in itertools.chain(self.parameters(), self.buffers())
        )
        hit = self._stacks.get(name)
        if hit is None or hit[0] != key:
            hit = self._stacks[name] = (key, build())
        return hit[1]

    def train(self, mode: bool = True) -> _Cached:
        """Switch mode and drop cached views."""
        self._stacks.clear()
        return super().train(mode)


class RoutedLoRA(_Cached):
    """Low-rank updates keyed by group (domain or aux value), applied per row by slot.

    ``style="mlora"``: A [d_in, r], B [r, d_out], bias [d_out]; u = scaling·(x A_k) B_k + bias_k.
    ``style="multilora"``: D [r, d_in], U [d_out, r], s [d_out], b [d_out];
    u = scaling·s_k ⊙ (U_k D_k x) + b_k.

    Args:
        d_in: input size.
        d_out: output size.
        rank: r.
        style: ``mlora`` or ``multilora``.
        scaling: constant factor on the low-rank product.
        init: ``mlora`` only: ``a_random`` or ``b_random`` (which factor is kaiming-uniform).
    """

    PARTS = {"mlora": ("A", "B", "bias"), "multilora": ("D", "U", "s", "b")}

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        *,
        style: str,
        scaling: float = 1.0,
        init: str = "a_random",
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank: must be >= 1, got {rank}")
        if init not in ("a_random", "b_random"):
            raise ValueError(f"init: must be a_random or b_random, got {init!r}")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.style, self.scaling, self.init = style, scaling, init
        for part in self.PARTS[style]:
            setattr(self, part, nn.ParameterDict())

    @property
    def keys(self) -> list[str]:
        """Group keys in slot order."""
        return list(getattr(self, self.PARTS[self.style][0]).keys())

    def add(self, key: str, device: torch.device, dtype: torch.dtype) -> None:
        """New group ``key``, initialised so that its update is exactly zero."""
        new = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        d_in, d_out, r = self.d_in, self.d_out, self.rank
        if self.style == "mlora":
            a, b = new(d_in, r), new(r, d_out)
            # kaiming-uniform on the [out, in] view, as PEFT does on nn.Linear weights.
            nn.init.kaiming_uniform_((a if self.init == "a_random" else b).T, a=math.sqrt(5))
            tensors = (a, b, new(d_out))
        else:
            tensors = (
                torch.randn(r, d_in, device=device, dtype=dtype) / math.sqrt(d_in),
                new(d_out, r),
                torch.randn(d_out, device=device, dtype=dtype),
                new(d_out),
            )
        for part, t in zip(self.PARTS[self.style], tensors, strict=True):
            getattr(self, part)[key] = nn.Parameter(t)

    def factors(self, key: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Group ``key`` as (first [d_in, r], second [r, d_out], scale [d_out] | None, bias [d_out])."""
        if self.style == "mlora":
            return self.A[key], self.B[key], None, self.bias[key]
        return self.D[key].T, self.U[key].T, self.s[key], self.b[key]

    def _stack(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        first, second, scale, bias = zip(*[self.factors(k) for k in self.keys], strict=True)
        scale = None if scale[0] is None else torch.stack(scale)
        return torch.cat(first, 1), torch.cat(second, 0), scale, torch.stack(bias)

    def forward(self, x: Tensor, route: Route) -> Tensor:
        """Per-row update.

        Args:
            x: [N, d_in] inputs.
            route: slots [N] into :attr:`keys` (-1: zero update).

        Returns:
            [N, d_out] updates u.
        """
        if route.single is not None:
            if route.single < 0:
                return x.new_zeros(x.shape[0], self.d_out)
            first, second, scale, bias = self.factors(self.keys[route.single])
            u = (x @ first) @ second  # [N, d_out]
        else:
            # first [d_in, K r], second [K r, d_out], scale and bias [K, d_out]
            first, second, scale, bias = self.stacked("lora", self._stack)
            onehot = _onehot(route.slots, len(self.keys), x.dtype)  # [N, K]
            u = ((x @ first) * onehot.repeat_interleave(self.rank, 1)) @ second  # [N, d_out]
            scale = None if scale is None else onehot @ scale
            bias = onehot @ bias  # [N, d_out]
        return self.scaling * (u if scale is None else u * scale) + bias

    def linear(self, x: Tensor, route: Route, base: nn.Linear) -> Tensor:
        """``base(x) + forward(x, route)`` for ``style="mlora"``, with no pass over [N, d_out] of its own.

        The per-domain bias joins the base bias (one domain) or the second factor (mixed rows:
        ``[(x A_cat) ⊙ M·scaling, onehot] @ [B_cat; bias]``), and the update is accumulated into
        the base output by an in-place ``addmm_`` (the base GEMM's backward needs only x and W,
        not its output). On one CPU thread this removes the scale, bias-add and residual-add
        passes that took ~30% of an adapter step.

        Args:
            x: [N, d_in] inputs.
            route: slots [N] into :attr:`keys` (-1: base output only).
            base: the frozen Linear (d_in -> d_out).

        Returns:
            [N, d_out].
        """
        if self.style != "mlora":
            raise ValueError("linear: only the mlora style adds its update to a base Linear")
        if route.single is not None:
            if route.single < 0:
                return base(x)
            a, b, _, bias = self.factors(self.keys[route.single])
            y = F.linear(x, base.weight, bias if base.bias is None else base.bias + bias)
            return y.addmm_(x @ a, b, alpha=self.scaling)
        first, second, _, bias = self.stacked("lora", self._stack)
        onehot = _onehot(route.slots, len(self.keys), x.dtype)  # [N, K]
        mask = onehot.repeat_interleave(self.rank, 1) * self.scaling  # [N, K r]
        h = torch.cat([(x @ first) * mask, onehot], 1)  # [N, K r + K]
        return base(x).addmm_(h, torch.cat([second, bias]))


class DomainModule(_Cached):
    """Frozen base module + domain-keyed containers; per-domain state for bundles."""

    #: container path -> key of the domain's tensors in :meth:`domain_state`.
    DOMAIN_PARTS: dict[str, str] = {}

    def __init__(self, base: nn.Module, router: Router | None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.domains: list[str] = []
        self.router = router if router is not None else Router()

    def add_domain(self, name: str) -> None:
        """Add a zero-update adapter for domain ``name`` (slot ``len(domains)``); others untouched."""
        if name in self.domains:
            raise ValueError(f"domain {name!r}: already has an adapter")
        like = next(self.base.parameters())
        self._new_domain(domain_key(name), like.device, like.dtype)
        self.domains.append(name)
        self._stacks.clear()

    def _new_domain(self, key: str, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError  # adds the containers' entries for domain ``key``

    def _owned(self, domain: str, params_only: bool) -> dict[str, tuple[str, Tensor]]:
        """Tensors of ``domain``: stripped key -> (name in this layer, tensor)."""
        if domain not in self.domains:
            raise ValueError(f"domain {domain!r}: no adapter (known: {self.domains})")
        key = domain_key(domain)
        out = {}
        buffers = [] if params_only else self.named_buffers()
        for name, t in itertools.chain(self.named_parameters(), buffers):
            for path, short in self.DOMAIN_PARTS.items():
                head = f"{path}.{key}"
                if name == head or name.startswith(head + "."):
                    out[short + name[len(head) :]] = (name, t)
        return out

    def domain_parameters(self, domain: str) -> dict[str, nn.Parameter]:
        """Trainable tensors of ``domain``, by their name inside this layer."""
        return dict(self._owned(domain, params_only=True).values())

    def domain_state(self, domain: str) -> dict[str, Tensor]:
        """Copies of ``domain``'s tensors (parameters and BN buffers), domain name stripped from keys."""
        return {
            k: t.detach().clone() for k, (_, t) in self._owned(domain, params_only=False).items()
        }

    @torch.no_grad()
    def load_domain_state(self, domain: str, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (as from :meth:`domain_state`) into ``domain``'s tensors; keys and shapes must match."""
        own = self._owned(domain, params_only=False)
        if set(state) != set(own):
            raise ValueError(
                f"domain {domain!r}: missing keys {sorted(set(own) - set(state))}, "
                f"unexpected keys {sorted(set(state) - set(own))}"
            )
        for k, (_, t) in own.items():
            if state[k].shape != t.shape:
                raise ValueError(f"domain {domain!r}: {k} is {state[k].shape}, expected {t.shape}")
            t.copy_(state[k])


class _AdaptedLinear(DomainModule):
    """Frozen base Linear + domain-keyed containers (LoRA-style layers of a tower)."""

    def __init__(self, base: nn.Linear, router: Router | None) -> None:
        if type(base) is not nn.Linear:
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        super().__init__(base, router)

    def _flat(self, x: Tensor, aux_values: list[str] | None = None) -> tuple[Tensor, list[Route]]:
        """x [B, *, d_in] as [N, d_in] and the checked routes repeated to N rows."""
        r = self.router
        if r.domain is None:
            raise RuntimeError("no routing set: run the forward in `with adapted.routing(slots):`")
        rows = r.domain.slots.shape[0]
        if x.dim() < 2 or x.shape[0] != rows:
            raise ValueError(f"input {tuple(x.shape)}: expected {rows} rows, as domain_slots")
        if r.domain.top >= len(self.domains):
            raise ValueError(f"domain_slots: slot {r.domain.top} out of range for {self.domains}")
        routes = [r.domain]
        if aux_values is not None:
            if r.aux is None:
                raise RuntimeError("no aux_slots in the routing: MultiLoRA needs them")
            if r.aux.top >= len(aux_values):
                raise ValueError(f"aux_slots: slot {r.aux.top} out of range for {aux_values}")
            routes.append(r.aux)
        n = x[0].numel() // self.base.in_features
        return x.reshape(-1, self.base.in_features), [rt.repeat(n) for rt in routes]


class DomainLoRALinear(_AdaptedLinear):
    """MLoRA layer: frozen Linear + per-domain low-rank update (see the module docstring).

    Args:
        base: the pretrained ``nn.Linear`` (frozen in place).
        domains: domain names; slot i routes to ``domains[i]``.
        rank: r.
        scaling: factor on (x A_d) B_d.
        init: ``a_random`` or ``b_random``.
        router: the model's shared :class:`Router` (a private one when None).

    Example::

        layer = DomainLoRALinear(nn.Linear(8, 4), ["books", "films"], rank=2)
        with layer.router.routing(torch.tensor([0, 1, -1])):
            y = layer(torch.randn(3, 8))  # [3, 4]; row 2 is the base output
    """

    DOMAIN_PARTS = {"lora.A": "A", "lora.B": "B", "lora.bias": "bias"}

    def __init__(
        self,
        base: nn.Linear,
        domains: list[str],
        rank: int,
        *,
        scaling: float = 1.0,
        init: str = "a_random",
        router: Router | None = None,
    ) -> None:
        super().__init__(base, router)
        self.lora = RoutedLoRA(
            base.in_features, base.out_features, rank, style="mlora", scaling=scaling, init=init
        )
        for name in domains:
            self.add_domain(name)

    def _new_domain(self, key: str, device: torch.device, dtype: torch.dtype) -> None:
        self.lora.add(key, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """y [B, *, d_out] = base(x) + per-row update, routed by the router's domain slots."""
        flat, (route,) = self._flat(x)
        return self.lora.linear(flat, route, self.base).view(*x.shape[:-1], -1)

    @torch.no_grad()
    def merged_linear(self, domain: str, *, safe: bool = True) -> nn.Linear:
        """A plain Linear with W' = W + scaling·(A_d B_d)^T, b' = b_W + b_d (single-domain serving).

        Raises:
            ValueError: ``safe`` and the merged weights hold NaN/inf (PEFT ``safe_merge``).
        """
        if domain not in self.domains:
            raise ValueError(f"domain {domain!r}: no adapter (known: {self.domains})")
        a, b, _, bias = self.lora.factors(domain_key(domain))
        w = self.base.weight + self.lora.scaling * (a @ b).T
        bias = bias if self.base.bias is None else self.base.bias + bias
        if safe and not (torch.isfinite(w).all() and torch.isfinite(bias).all()):
            raise ValueError(f"merge of domain {domain!r}: non-finite weights, adapter is broken")
        out = nn.Linear(
            self.base.in_features, self.base.out_features, device=w.device, dtype=w.dtype
        )
        out.weight.copy_(w)
        out.bias.copy_(bias)
        return out.requires_grad_(False)
