"""Put per-domain adapters on the Linear layers of a model's tower, freeze everything else.

:func:`inject` swaps the target ``nn.Linear`` modules of ``model.<root>`` in place for
:class:`~mdlora.adapters.lora.DomainLoRALinear` (``mlora``) or
:class:`~mdlora.adapters.multilora.MultiLoRALinear` (``multilora``), all sharing one
:class:`~mdlora.adapters.lora.Router`, and returns an :class:`AdaptedModel` handle. The tower's forward
is unchanged; the caller routes each batch::

    adapted = inject(model, LoraConfig(alpha=16), domains=["books", "films"])
    opt = torch.optim.Adam(adapted.adapter_params().values())
    with adapted.routing(domain_slots):  # [B] int64, index into adapted.domain_names, -1: none
        loss = loss_fn(model(batch), labels)
    loss.backward()

:meth:`AdaptedModel.merge` returns a merged copy, so there is no unmerge: the adapted model is
never modified by it.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from mdlora.adapters.config import LoraConfig
from mdlora.adapters.lora import DomainLoRALinear, DomainModule, Router
from mdlora.adapters.multilora import MultiLoRALinear
from mdlora.adapters.wide import WideOutput, WideSpec


class AdaptedModel:
    """Handle over a model whose target Linears carry per-domain adapters.

    Attributes:
        model: the adapted model (modified in place by :func:`inject`).
        config: the :class:`LoraConfig` used.
        layers: qualified name (e.g. ``tower.mlp.0``) -> adapted layer, in module order (the
            wide adapter around the output layer, ``out``, last).
        router: the :class:`Router` shared by the layers.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig,
        layers: dict[str, DomainModule],
        router: Router,
    ) -> None:
        self.model, self.config, self.layers, self.router = model, config, layers, router

    @property
    def domain_names(self) -> list[str]:
        """Domains in slot order (slot i of ``domain_slots`` routes to ``domain_names[i]``)."""
        return list(next(iter(self.layers.values())).domains)

    @property
    def wide(self) -> WideSpec | None:
        """What the wide adapter reads (None: no wide adapter)."""
        layer = next((m for m in self.layers.values() if isinstance(m, WideOutput)), None)
        return None if layer is None else layer.spec

    def set_routing(self, domain_slots: Tensor, aux_slots: Tensor | None = None,
                    wide: tuple[Tensor, Tensor] | None = None) -> None:
        """Route the following forwards: slots [B] int64 (-1: no adapter); aux slots for MultiLoRA;
        the rows' ids [B, S] and dense block [B, N] for a wide adapter."""
        self.router.set(domain_slots, aux_slots, wide)

    @contextmanager
    def routing(self, domain_slots: Tensor, aux_slots: Tensor | None = None,
                wide: tuple[Tensor, Tensor] | None = None) -> Iterator[None]:
        """Context manager form of :meth:`set_routing`; clears the routing on exit."""
        with self.router.routing(domain_slots, aux_slots, wide):
            yield

    def adapter_params(self, domain: str | None = None) -> dict[str, nn.Parameter]:
        """Trainable adapter parameters (LoRA, fusion, BN) by qualified name.

        Args:
            domain: only this domain's own parameters; None: all of them, including the
                MultiLoRA aux LoRAs shared by every domain.

        Returns:
            Qualified name -> parameter (the live tensors, for an optimizer).
        """
        out = {}
        for name, layer in self.layers.items():
            if domain is None:
                own = {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}
            else:
                own = layer.domain_parameters(domain)
            out.update({f"{name}.{n}": p for n, p in own.items()})
        return out

    def param_count(self, domain: str) -> int:
        """Number of trainable scalars owned by ``domain`` across all layers."""
        return sum(p.numel() for p in self.adapter_params(domain).values())

    def add_domain(self, name: str) -> None:
        """Give every layer a zero-update adapter for ``name`` (the next slot); others untouched."""
        for layer in self.layers.values():
            layer.add_domain(name)

    def state_for(self, domain: str) -> dict[str, Tensor]:
        """Copies of all of ``domain``'s tensors, keyed ``<layer>.<key>`` (``tower.mlp.0.A``)."""
        return {
            f"{name}.{k}": t
            for name, layer in self.layers.items()
            for k, t in layer.domain_state(domain).items()
        }

    def load_state_for(self, domain: str, state: dict[str, Tensor]) -> None:
        """Load ``state`` (as from :meth:`state_for`) into ``domain``; every key must match.

        Raises:
            ValueError: missing or unexpected keys (named), or a shape mismatch.
        """
        expected = {
            f"{n}.{k}" for n, layer in self.layers.items() for k in layer.domain_state(domain)
        }
        if set(state) != expected:
            raise ValueError(
                f"domain {domain!r}: missing keys {sorted(expected - set(state))}, "
                f"unexpected keys {sorted(set(state) - expected)}"
            )
        for name, layer in self.layers.items():
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            layer.load_domain_state(domain, own)

    def shared_state(self) -> dict[str, Tensor]:
        """Copies of the tensors shared by all domains (MultiLoRA aux LoRAs; empty for MLoRA)."""
        return {
            f"{name}.aux_lora.{k}": t.detach().clone()
            for name, layer in self.layers.items()
            if isinstance(layer, MultiLoRALinear)
            for k, t in layer.aux_lora.state_dict().items()
        }

    @torch.no_grad()
    def load_shared_state(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`shared_state` output (strict: every key must match)."""
        expected = set(self.shared_state())
        if set(state) != expected:
            raise ValueError(
                f"shared state: missing keys {sorted(expected - set(state))}, "
                f"unexpected keys {sorted(set(state) - expected)}"
            )
        for name, layer in self.layers.items():
            if isinstance(layer, MultiLoRALinear):
                prefix = f"{name}.aux_lora."
                layer.aux_lora.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                )

    def merge(self, domain: str, *, safe: bool = True) -> nn.Module:
        """A copy of the model serving only ``domain``: target layers become merged ``nn.Linear``.

        Frozen tensors outside the adapters (embeddings, other layers) are shared with the
        adapted model, not copied.

        Raises:
            ValueError: method is not ``mlora`` (MultiLoRA's BN and fusion do not fold into a
                Linear), ``domain`` is unknown, or (``safe``) merged weights are non-finite.
        """
        if self.config.method != "mlora":
            raise ValueError(
                f"merge: only mlora adapters merge, this model uses {self.config.method}"
            )
        merged = {
            name: layer.merged_linear(domain, safe=safe) for name, layer in self.layers.items()
        }
        adapter_ids = {id(t) for layer in self.layers.values() for t in _tensors(layer)}
        memo = {id(t): t for t in _tensors(self.model) if id(t) not in adapter_ids}
        out = copy.deepcopy(self.model, memo)
        for name, linear in merged.items():
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, linear)
        return out


def _tensors(module: nn.Module) -> Iterator[Tensor]:
    return itertools.chain(module.parameters(), module.buffers())


def inject(
    model: nn.Module,
    config: LoraConfig,
    domains: list[str],
    aux_values: list[str] | None = None,
    *,
    root: str = "tower",
    wide: WideSpec | None = None,
    out: str = "out",
) -> AdaptedModel:
    """Swap the target Linears of ``model.<root>`` for adapted layers, in place; freeze the rest.

    Targets are the modules of exact type ``nn.Linear`` under ``root`` whose name relative to
    ``root`` (``mlp.0``) matches a pattern of ``config.targets`` (fnmatch; empty: all).
    Subclasses such as ``MultiheadAttention.out_proj`` are skipped: their owners read the weight
    directly, so a swapped module would never run.

    Args:
        model: the model (e.g. the backbone); every existing parameter gets requires_grad False.
        config: adapter settings.
        domains: domain names, slot order.
        aux_values: values of the auxiliary division ``config.aux`` (``multilora`` only).
        root: qualified name of the tower inside ``model`` ("" for the whole model).
        wide: the features of the wide adapter ``config.wide`` names (the trainer builds it
            from the schema); required when ``config.wide`` is set.
        out: qualified name of the output layer the wide adapter wraps.

    Returns:
        The :class:`AdaptedModel` handle.

    Raises:
        ValueError: no such root, already adapted, no target matched, bad domains or aux values,
            or ``config.ranks`` does not have one rank per target.
    """
    try:
        tower = model.get_submodule(root)
    except AttributeError:
        raise ValueError(f"root: model has no submodule {root!r}") from None
    if bool(config.wide) != bool(wide):
        raise ValueError(f"wide: config.wide {config.wide} needs a WideSpec of its features, got {wide}")
    if any(isinstance(m, DomainModule) for m in model.modules()):
        raise ValueError("model: already has adapters; inject once per model")
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains: expected distinct names, got {domains}")
    if (config.method == "multilora") != bool(aux_values):
        raise ValueError(
            f"aux_values: needed by multilora only (method {config.method}, aux {config.aux!r})"
        )
    linears = {n: m for n, m in tower.named_modules() if type(m) is nn.Linear}
    for pattern in config.targets:
        if not any(fnmatchcase(n, pattern) for n in linears):
            warnings.warn(
                f"targets: {pattern!r} matches no nn.Linear under {root!r} {list(linears)}",
                stacklevel=2,
            )
    chosen = [n for n in linears if any(fnmatchcase(n, p) for p in config.targets or ["*"])]
    if not chosen:
        raise ValueError(
            f"targets: {config.targets} match no nn.Linear under {root!r} {list(linears)}"
        )
    ranks = config.ranks_for(chosen, [linears[n].out_features for n in chosen])
    model.requires_grad_(False)
    router, layers = Router(), {}
    for name, rank in zip(chosen, ranks, strict=True):
        base = linears[name]
        if config.method == "mlora":
            layer = DomainLoRALinear(
                base, domains, rank, scaling=config.scaling, init=config.init, router=router
            )
        else:
            layer = MultiLoRALinear(
                base,
                domains,
                aux_values,
                rank,
                scaling=config.scaling,
                fusion=config.fusion,
                fusion_dim=config.fusion_dim,
                domain_bn=config.domain_bn,
                router=router,
            )
        parent, _, child = name.rpartition(".")
        setattr(tower.get_submodule(parent), child, layer)
        layers[f"{root}.{name}" if root else name] = layer
    if wide:
        parent, _, child = out.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layers[out] = WideOutput(getattr(owner, child), domains, wide, router)
        setattr(owner, child, layers[out])
    return AdaptedModel(model, config, layers, router)
