"""Adapter training on the frozen backbone's cached embedding-layer output. No Ray, no log I/O.

Letters: N rows, E width of the embedding-layer output ``x`` (:meth:`Backbone.embed`), K domains,
A auxiliary divisions.

Why a cache is exact: the backbone is frozen, so ``x = embed(sparse, dense)`` of a row never
changes during adaptation. :func:`materialise` computes it once (no grad; on sharded tables each
rank embeds its own rows), and the adapters then train on :class:`Head` — a frozen copy of the
tower and output layer, ``logit = out(tower(x))`` — with per-domain LoRA injected into its Linears.
Embeddings get no gradients and no optimiser state, and a step costs only the small head.

* MLoRA (:func:`train_mlora`): every domain is independent: its own init seed, its own
  single-domain batches, its own Adam state, its own early stopping on its validation AUC (the
  best state is kept). Up to ``pack`` domains share one routed head copy so that a step carries
  one batch of each (steps follow the largest domain, not the number of domains); results do
  not depend on the pack or process a domain lands in (up to float rounding), so callers may
  partition domains over processes freely.
* MultiLoRA (:func:`train_multilora`): the aux-value LoRAs are shared by all domains, so domains
  train jointly on mixed batches; each domain still has its own Adam (stepped only on batches
  holding its rows), early stopping and best state; a stopped domain's rows leave the batches.

Metrics per domain and split (``validation``, ``test``): AUC and LogLoss of the frozen head
alone and with the adapter, and the sample count.
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.config import LoraConfig
from adapters.inject import AdaptedModel, inject
from adapters.lora import DomainLoRALinear
from embeddings.batch import Batch
from trainer.backbone import Backbone
from trainer.config import AdaptTrainConfig, LoopConfig
from trainer.metrics import DomainMetrics

EVAL_ROWS = 65536
SPLITS = ("validation", "test")


@dataclass
class Features:
    """Cached embedding-layer output of N rows.

    Attributes:
        x: float32 [N, E] = ``Backbone.embed(sparse, dense)``.
        labels: float32 [N].
        domains: int64 [N] ids into the schema's domain vocabulary.
        aux: int64 [N, A] auxiliary division ids.
    """

    x: Tensor
    labels: Tensor
    domains: Tensor
    aux: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: Tensor) -> Features:
        """Rows picked by a bool mask or an index tensor."""
        return Features(self.x[index], self.labels[index], self.domains[index], self.aux[index])

    def of_domain(self, domain_id: int) -> Features:
        """The rows of one domain."""
        return self.select(self.domains == domain_id)

    @staticmethod
    def cat(parts: list[Features], width: int, aux: int) -> Features:
        """Concatenate row-wise; an empty list gives 0 rows of ``[0, width]`` / ``[0, aux]``."""
        if not parts:
            return Features(torch.zeros(0, width), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, aux, dtype=torch.long))
        return Features(*(torch.cat(t) for t in zip(*(p.tensors() for p in parts), strict=True)))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x, labels, domains, aux)``."""
        return self.x, self.labels, self.domains, self.aux

    def split(self, seed: int, validation: float = 0.1) -> dict[str, Features]:
        """Seeded random ``{"train", "validation"}`` partition; validation gets floor(N·share) rows."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - int(len(self) * validation)
        return {"train": self.select(perm[:cut]), "validation": self.select(perm[cut:])}


@torch.no_grad()
def materialise(backbone: Backbone, batches: Iterable[Batch]) -> Features:
    """Embed every batch once with the frozen embedding layer.

    Args:
        backbone: the backbone (unsharded, or the inner module of a DMP: its sharded EBC runs the
            all-to-all, so every rank passes the same number of batches; it takes 0-row batches,
            which an unsharded EBC rejects).
        batches: this rank's batches.

    Returns:
        Their :class:`Features`, rows in batch order.
    """
    parts = [Features(backbone.embed(b.sparse, b.dense).float().cpu(), b.labels.cpu(),
                      b.domains.cpu(), b.aux.cpu()) for b in batches]
    return Features.cat(parts, backbone.input_dim, 0 if not parts else parts[0].aux.shape[1])


class Head(nn.Module):
    """What the backbone computes after ``x``: ``logit = out(tower(x))`` [B] (frozen copies).

    Args:
        tower: the backbone's ``tower`` (copied).
        out: the backbone's ``out`` (copied).
    """

    def __init__(self, tower: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.tower, self.out = copy.deepcopy(tower), copy.deepcopy(out)
        self.requires_grad_(False)

    @classmethod
    def of(cls, backbone: Backbone) -> Head:
        """The frozen head of ``backbone`` (its tower and output layer, copied)."""
        return cls(backbone.tower, backbone.out)

    def forward(self, x: Tensor) -> Tensor:
        """[B, E] -> logits [B]."""
        return self.out(self.tower(x)).squeeze(1)

    def param_count(self) -> int:
        """Dense backbone parameters (tower + output): the denominator of ``param_share``."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class DomainResult:
    """One domain's trained adapter and how it did."""

    domain: str
    state: dict[str, Tensor]
    """The domain's adapter tensors at its best epoch (:meth:`AdaptedModel.state_for`)."""
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """Per split: ``auc_backbone``, ``auc_adapter``, ``logloss_backbone``, ``logloss_adapter``, ``samples``."""
    train_samples: int = 0
    best_epoch: int = 0
    """Epoch (1-based) whose state was kept; 0: the initial (zero-update) state."""
    history: list[float | None] = field(default_factory=list)
    """Validation score after each epoch (AUC, or -LogLoss when AUC is undefined)."""


def domain_seed(seed: int, domain: str) -> int:
    """Seed of one domain's init and batch order: the same wherever and with whom it runs."""
    return zlib.crc32(f"{seed}:{domain}".encode())


@torch.no_grad()
def predict(model: nn.Module, adapted: AdaptedModel | None, feats: Features,
            slots: Tensor | None = None, aux_col: int | None = None) -> Tensor:
    """Probabilities [N] of ``model`` on cached features, routed by ``slots`` [N] (eval mode)."""
    model.eval()
    out = []
    for lo in range(0, len(feats), EVAL_ROWS):
        rows = slice(lo, lo + EVAL_ROWS)
        aux = None if aux_col is None else feats.aux[rows, aux_col]
        with adapted.routing(slots[rows], aux) if adapted is not None else contextlib.nullcontext():
            out.append(torch.sigmoid(model(feats.x[rows])))
    return torch.cat(out) if out else torch.zeros(0)


def _score(probs: Tensor, labels: Tensor) -> dict:
    """``{"auc", "logloss", "n", "pos_rate"}`` of one group of rows."""
    m = DomainMetrics(["d"])
    m.update(probs, labels, torch.zeros_like(labels, dtype=torch.long))
    return m.compute(gather=False)["domains"]["d"]


def _val_score(probs: Tensor, labels: Tensor) -> float | None:
    s = _score(probs, labels)
    return s["auc"] if s["auc"] is not None else (-s["logloss"] if s["n"] else None)


def compare(base: Tensor, adapted: Tensor, labels: Tensor) -> dict[str, float | None]:
    """Metrics of one split: frozen backbone vs adapter."""
    b, a = _score(base, labels), _score(adapted, labels)
    return {"auc_backbone": b["auc"], "auc_adapter": a["auc"], "logloss_backbone": b["logloss"],
            "logloss_adapter": a["logloss"], "samples": b["n"]}


def _batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + size] for i in range(0, n, size)]


def _initial_states(adapted: AdaptedModel, lora: LoraConfig, domains: list[str], seed: int) -> None:
    """Give each domain the zero-update init it would get alone (``inject`` with only it, seeded
    by :func:`domain_seed`): the same RNG draws in the same layer order, whatever its pack."""
    for d in domains:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(domain_seed(seed, d))
            for layer in adapted.layers.values():
                fresh = DomainLoRALinear(layer.base, [d], layer.lora.rank, scaling=lora.scaling, init=lora.init)
                layer.load_domain_state(d, fresh.domain_state(d))


def train_mlora(head: Head, lora: LoraConfig, vocab: list[str], domains: list[str],
                splits: dict[str, Features], cfg: AdaptTrainConfig, loop: LoopConfig) -> list[DomainResult]:
    """Train each of ``domains`` (ids into ``vocab``) on its own rows, ``cfg.pack`` at a time.

    A pack of P domains shares one routed model but nothing else: step i holds the i-th batch of
    each domain still in its epoch, the loss is ``sum_d mean_{rows of d} BCE`` (so each domain's
    gradient is its single-domain batch gradient), domains without a batch in the step get no
    gradient (``grad = None``: Adam skips them, and Adam state is per parameter), and every domain
    stops on its own validation AUC. A domain's result is therefore the same — up to float
    rounding — whatever it is packed or partitioned with, while a pack costs
    ``max_d ceil(n_d / batch)`` steps instead of ``sum_d ceil(n_d / batch)``.

    Args:
        head: the frozen head (copied here, never modified).
        lora: adapter config (``method`` mlora).
        vocab: domain vocabulary the feature ``domains`` ids index.
        domains: domains to train.
        splits: ``train`` (required), ``validation`` and ``test`` (optional) features.
        cfg: learning rate, batch size, pack size.
        loop: ``epochs``, ``patience`` (epochs without a better validation score), ``seed``.

    Returns:
        One :class:`DomainResult` per domain (state at its best validation epoch), in order.
    """
    out = []
    for lo in range(0, len(domains), cfg.pack):
        out += _train_pack(head, lora, vocab, domains[lo:lo + cfg.pack], splits, cfg, loop)
    return out


def train_mlora_domain(head: Head, lora: LoraConfig, domain: str, splits: dict[str, Features],
                       cfg: AdaptTrainConfig, loop: LoopConfig) -> DomainResult:
    """:func:`train_mlora` of one domain whose rows are all of ``splits``."""
    own = {s: Features(f.x, f.labels, torch.zeros_like(f.domains), f.aux) for s, f in splits.items()}
    return train_mlora(head, lora, [domain], [domain], own, cfg, loop)[0]


def _train_pack(head: Head, lora: LoraConfig, vocab: list[str], pack: list[str],
                splits: dict[str, Features], cfg: AdaptTrainConfig, loop: LoopConfig) -> list[DomainResult]:
    model = copy.deepcopy(head)
    adapted = inject(model, lora, pack, root="tower")
    _initial_states(adapted, lora, pack, loop.seed)
    own = {d: list(adapted.adapter_params(d).values()) for d in pack}
    opt = torch.optim.Adam(adapted.adapter_params().values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lut = torch.full((len(vocab),), -1, dtype=torch.long)
    lut[[vocab.index(d) for d in pack]] = torch.arange(len(pack))
    part = {s: f.select(lut[f.domains] >= 0) for s, f in splits.items()}
    slots = {s: lut[f.domains] for s, f in part.items()}
    train, val = part["train"], part.get("validation")
    rows = [torch.nonzero(slots["train"] == k).squeeze(1) for k in range(len(pack))]
    gens = [torch.Generator().manual_seed(domain_seed(loop.seed, d)) for d in pack]
    results = [DomainResult(d, adapted.state_for(d)) for d in pack]
    best = _val_scores(model, adapted, val, slots.get("validation"), len(pack))
    active = set(range(len(pack)))
    for epoch in range(1, loop.epochs + 1):
        model.train()
        orders = {k: _batches(len(rows[k]), cfg.batch_size, gens[k]) for k in sorted(active)}
        for step in range(max((len(o) for o in orders.values()), default=0)):
            batch = [(k, rows[k][o[step]]) for k, o in orders.items() if step < len(o)]
            idx = torch.cat([i for _, i in batch])
            slot = torch.cat([torch.full((len(i),), k) for k, i in batch])
            weight = torch.cat([torch.full((len(i),), 1.0 / len(i)) for _, i in batch])
            with adapted.routing(slot):
                per_row = F.binary_cross_entropy_with_logits(model(train.x[idx]), train.labels[idx],
                                                             reduction="none")
            opt.zero_grad(set_to_none=True)
            (per_row * weight).sum().backward()
            stepping = {k for k, _ in batch}
            for k in set(range(len(pack))) - stepping:
                for p in own[pack[k]]:
                    p.grad = None  # Adam skips it: no update, no state change
            opt.step()
        scores = _val_scores(model, adapted, val, slots.get("validation"), len(pack))
        for k in sorted(active):
            r = results[k]
            r.history.append(scores[k])
            if scores[k] is None or best[k] is None or scores[k] > best[k]:
                best[k], r.state, r.best_epoch = scores[k], adapted.state_for(pack[k]), epoch
            elif loop.patience and epoch - r.best_epoch >= loop.patience:
                active.discard(k)
        if not active:
            break
    for k, r in enumerate(results):
        if r.best_epoch != len(r.history):  # the kept state is not the current one
            adapted.load_state_for(r.domain, r.state)
        r.train_samples = len(rows[k])
    _final_metrics(head, model, adapted, part, slots, results)
    return results


def _final_metrics(head: Head, model: nn.Module, adapted: AdaptedModel, part: dict[str, Features],
                   slots: dict[str, Tensor], results: list[DomainResult], aux_col: int | None = None) -> None:
    """Fill each result's validation/test metrics: frozen head vs the assembled adapted model."""
    for split in SPLITS:
        f = part.get(split)
        if f is None or not len(f):
            continue
        base, mine = predict(head, None, f), predict(model, adapted, f, slots[split], aux_col)
        for k, r in enumerate(results):
            m = slots[split] == k
            if m.any():
                r.metrics[split] = compare(base[m], mine[m], f.labels[m])


def _val_scores(model: nn.Module, adapted: AdaptedModel, val: Features | None, slots: Tensor | None,
                k: int, aux_col: int | None = None) -> list[float | None]:
    """Validation score of each of ``k`` routed domains (None: no validation rows)."""
    if val is None or not len(val):
        return [None] * k
    probs = predict(model, adapted, val, slots, aux_col)
    return [_val_score(probs[slots == j], val.labels[slots == j]) if (slots == j).any() else None
            for j in range(k)]


def train_multilora(head: Head, lora: LoraConfig, vocab: list[str], domains: list[str],
                    aux_values: list[str], aux_col: int, splits: dict[str, Features],
                    cfg: AdaptTrainConfig, loop: LoopConfig,
                    shared: dict[str, Tensor] | None = None) -> tuple[list[DomainResult], dict[str, Tensor]]:
    """Train MultiLoRA adapters of ``domains`` jointly (shared aux LoRAs), per-domain stopping.

    Args:
        head: the frozen head (copied here).
        lora: adapter config (``method`` multilora).
        vocab: domain vocabulary the feature ``domains`` ids index.
        domains: domains to train (rows of other domains are ignored).
        aux_values: values of the aux division ``lora.aux``.
        aux_col: its column in ``Features.aux``.
        splits: ``train`` (required), ``validation``, ``test``.
        cfg: learning rate, batch size (mixed-domain batches).
        loop: ``epochs``, ``patience``, ``seed``.
        shared: aux LoRA state to start from and keep frozen (``add-domain``: deployed domains
            share it); None trains it.

    Returns:
        ``(results, shared state)``; every metric is computed with the kept states assembled.
    """
    model = copy.deepcopy(head)
    with torch.random.fork_rng():
        torch.manual_seed(domain_seed(loop.seed, ",".join(domains)))
        adapted = inject(model, lora, list(domains), aux_values, root="tower")
    if shared is not None:
        adapted.load_shared_state(shared)
    own = {d: adapted.adapter_params(d) for d in domains}
    owned = {id(p) for ps in own.values() for p in ps.values()}
    opts = {d: torch.optim.Adam(ps.values(), lr=cfg.lr, weight_decay=cfg.weight_decay) for d, ps in own.items()}
    shared_params = [p for p in adapted.adapter_params().values() if id(p) not in owned]
    if shared is None and shared_params:
        opts[""] = torch.optim.Adam(shared_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lut = torch.full((len(vocab),), -1, dtype=torch.long)
    lut[[vocab.index(d) for d in domains]] = torch.arange(len(domains))
    part = {s: f.select(lut[f.domains] >= 0) for s, f in splits.items()}
    slots = {s: lut[f.domains] for s, f in part.items()}
    results = {d: DomainResult(d, adapted.state_for(d)) for d in domains}
    val = part.get("validation")
    # init = the frozen backbone (fresh BN in eval ~ identity): kept when never beaten on validation
    scores = _val_scores(model, adapted, val, slots.get("validation"), len(domains), aux_col)
    best = dict(zip(domains, scores, strict=True))
    active, gen, train = set(domains), torch.Generator().manual_seed(domain_seed(loop.seed, "multilora")), part["train"]
    for epoch in range(1, loop.epochs + 1):
        live = torch.tensor([d in active for d in domains], dtype=torch.bool)
        rows = torch.nonzero(live[slots["train"]]).squeeze(1)
        model.train()
        for idx in _batches(len(rows), cfg.batch_size, gen):
            idx = rows[idx]
            with adapted.routing(slots["train"][idx], train.aux[idx, aux_col]):
                loss = F.binary_cross_entropy_with_logits(model(train.x[idx]), train.labels[idx])
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            loss.backward()
            present = {domains[s] for s in slots["train"][idx].unique().tolist()}
            for d, o in opts.items():
                if d == "" or d in present:
                    o.step()
        scores = _val_scores(model, adapted, val, slots.get("validation"), len(domains), aux_col)
        for k, d in enumerate(domains):
            if d not in active:
                continue
            results[d].history.append(score := scores[k])
            if score is None or best[d] is None or score > best[d]:
                best[d], results[d].state, results[d].best_epoch = score, adapted.state_for(d), epoch
            elif loop.patience and epoch - results[d].best_epoch >= loop.patience:
                active.discard(d)
        if not active:
            break
    for d in domains:
        adapted.load_state_for(d, results[d].state)
        results[d].train_samples = int((slots["train"] == domains.index(d)).sum())
    _final_metrics(head, model, adapted, part, slots, [results[d] for d in domains], aux_col)
    return [results[d] for d in domains], adapted.shared_state()
