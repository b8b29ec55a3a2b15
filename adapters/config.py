"""Typed LoRA adapter configuration (loaded with ``mdlora.config``, like every config).

A YAML section is a short diff over these defaults::

    lora: {method: mlora, alpha: 16, targets: ["mlp.*"]}
    lora: {method: multilora, ranks: [16, 8], aux: gender, fusion: attention}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_ALPHA = 128.0


@dataclass(kw_only=True)
class LoraConfig:
    """Per-domain LoRA on the Linear layers of a frozen tower."""

    method: Literal["mlora", "multilora"] = "mlora"
    """``mlora``: y = xW^T + b_W + scaling·x A_d B_d + b_d (arXiv 2408.08913); ``multilora``:
    s⊙(U D x) + b updates for the domain and an auxiliary division, fused, then domain BN."""
    alpha: float | None = None
    """Temperature α: the rank of a layer is r = max(1, out_features // α). Exactly one of
    ``alpha``/``ranks`` may be set; when neither is, α = 128 (about 2.5 % of a 256-128 tower
    per domain, inside the 3 % budget)."""
    ranks: list[int] | None = None
    """Explicit rank per target layer, in module order (one entry per matched Linear)."""
    targets: list[str] = field(default_factory=list)
    """fnmatch patterns on module names relative to the tower (``mlp.*``); empty: every
    ``nn.Linear`` of the tower."""
    scaling: float = 1.0
    """Constant factor on the low-rank update."""
    init: Literal["a_random", "b_random"] = "a_random"
    """Which factor starts kaiming-uniform; the other starts at zero (update zero at init).
    MultiLoRA ignores it: D and s are Gaussian, U and b zero."""
    fusion: Literal["attention", "add", "avg"] = "attention"
    """MultiLoRA: how the domain and aux updates combine (attention over the two, sum, mean)."""
    aux: str = ""
    """MultiLoRA: name of the auxiliary division whose values get their own LoRAs (required)."""
    fusion_dim: int = 16
    """MultiLoRA: dimension the fusion query and keys are projected to."""
    domain_bn: bool = True
    """MultiLoRA: BatchNorm1d per combined domain (domain × aux value) after the adapted layer,
    residual (y = z + BN(z), γ = β = 0 at init) so that the adapted model starts at the backbone."""

    wide: list[str] = field(default_factory=list)
    """Features whose per-domain effect a wide adapter adds to the logit (:mod:`mdlora.adapters.wide`):
    a sparse feature gets a per-domain table of ``wide_buckets`` scalars (its hashed id modulo the
    table size; a bag takes the mean), a dense feature a per-domain slope. ``["*"]``: every
    feature of the schema; empty: the tower LoRA alone."""
    wide_buckets: int = 4096
    """Entries of a wide table per sparse feature and domain (fewer when the feature's embedding
    table has fewer rows)."""

    def __post_init__(self) -> None:
        if self.method not in ("mlora", "multilora"):
            raise ValueError(f"method: unknown method {self.method!r} (known: mlora, multilora)")
        if self.alpha is not None and self.ranks is not None:
            raise ValueError("alpha/ranks: set exactly one of them, got both")
        if self.alpha is None and self.ranks is None:
            self.alpha = DEFAULT_ALPHA
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if self.ranks is not None and (not self.ranks or any(r <= 0 for r in self.ranks)):
            raise ValueError(f"ranks: needs one rank >= 1 per target layer, got {self.ranks}")
        if self.init not in ("a_random", "b_random"):
            raise ValueError(f"init: must be a_random or b_random, got {self.init!r}")
        if self.fusion not in ("attention", "add", "avg"):
            raise ValueError(f"fusion: must be attention, add or avg, got {self.fusion!r}")
        if self.fusion_dim < 1:
            raise ValueError(f"fusion_dim: must be >= 1, got {self.fusion_dim}")
        if self.method == "multilora" and not self.aux:
            raise ValueError("aux: method multilora needs an auxiliary division name")
        if self.wide_buckets < 1:
            raise ValueError(f"wide_buckets: must be >= 1, got {self.wide_buckets}")
        if len(set(self.wide)) != len(self.wide) or ("*" in self.wide and len(self.wide) > 1):
            raise ValueError(f"wide: features must be distinct (or [\"*\"] alone), got {self.wide}")
        if self.method == "mlora" and self.aux:
            raise ValueError(f"aux: only used by method multilora, got {self.aux!r} with mlora")

    def ranks_for(self, names: list[str], out_features: list[int]) -> list[int]:
        """Rank of each target layer.

        Args:
            names: qualified names of the target layers, in module order (for errors).
            out_features: their output sizes d_out.

        Returns:
            One rank per layer: ``ranks`` as given, or max(1, d_out // α).

        Raises:
            ValueError: ``ranks`` does not have one entry per target layer.
        """
        if self.ranks is None:
            return [max(1, int(d // self.alpha)) for d in out_features]
        if len(self.ranks) != len(names):
            raise ValueError(
                f"ranks: {len(self.ranks)} ranks {self.ranks} for {len(names)} target layers {names}"
            )
        return list(self.ranks)
