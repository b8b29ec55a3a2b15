"""Adapter training on the frozen backbone's cached embedding-layer output. No Ray, no log I/O.

Letters: N rows, E width of the embedding-layer output ``x`` (:meth:`Backbone.embed`), K domains,
A auxiliary divisions.

Why a cache is exact: the backbone is frozen, so ``x = embed(sparse, dense)`` of a row never
changes during adaptation. :func:`materialise` computes it once (no grad; on sharded tables each
rank embeds its own rows), and the adapters then train on :class:`Head` — a frozen copy of the
tower and output layer, ``logit = out(tower(x))`` — with per-domain LoRA injected into its Linears.
Embeddings get no gradients and no optimiser state, and a step costs only the small head.

* MLoRA (:func:`train_mlora`): every domain is independent: a fresh head copy holding only that
  domain's adapter, its own single-domain batches, its own Adam, its own early stopping on its
  validation AUC (the best state is kept). Results do not depend on which other domains run in
  the same process, so callers may partition domains over processes freely.
* MultiLoRA (:func:`train_multilora`): the aux-value LoRAs are shared by all domains, so domains
  train jointly on mixed batches; each domain still has its own Adam (stepped only on batches
  holding its rows), early stopping and best state; a stopped domain's rows leave the batches.

Metrics per domain and split (``validation``, ``test``): AUC and LogLoss of the frozen head
alone and with the adapter, and the sample count.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.config import LoraConfig
from adapters.inject import AdaptedModel, inject
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


@torch.no_grad()
def materialise(backbone: Backbone, batches: Iterable[Batch]) -> Features:
    """Embed every batch once with the frozen embedding layer.

    Args:
        backbone: the backbone (unsharded, or the inner module of a DMP: its sharded EBC runs the
            all-to-all, so every rank must pass the same number of batches; 0-row batches are fine).
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
        """Dense backbone parameters (tower + output), the denominator of ``param_share``."""
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
        x = feats.x[lo:lo + EVAL_ROWS]
        if adapted is None:
            out.append(torch.sigmoid(model(x)))
            continue
        aux = None if aux_col is None else feats.aux[lo:lo + EVAL_ROWS, aux_col]
        with adapted.routing(slots[lo:lo + EVAL_ROWS], aux):
            out.append(torch.sigmoid(model(x)))
    return torch.cat(out) if out else torch.zeros(0)


def _score(probs: Tensor, labels: Tensor) -> dict:
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


def train_mlora_domain(head: Head, lora: LoraConfig, domain: str, splits: dict[str, Features],
                       cfg: AdaptTrainConfig, loop: LoopConfig) -> DomainResult:
    """Train one domain's MLoRA adapter on its own rows (independent of every other domain).

    Args:
        head: the frozen head (copied here, never modified).
        lora: adapter config (``method`` mlora).
        domain: the domain name.
        splits: this domain's rows: ``train`` (required), ``validation`` and ``test`` (optional).
        cfg: learning rate, batch size.
        loop: ``epochs``, ``patience`` (epochs without a better validation score), ``seed``.

    Returns:
        The :class:`DomainResult` (state at the best validation epoch).
    """
    seed = domain_seed(loop.seed, domain)
    model = copy.deepcopy(head)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapted = inject(model, lora, [domain], root="tower")
    params = list(adapted.adapter_params(domain).values())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train, val = splits["train"], splits.get("validation")
    zeros = lambda f: torch.zeros(len(f), dtype=torch.long)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    best_state, best, result = adapted.state_for(domain), None, DomainResult(domain, {})
    if val is not None and len(val):
        best = _val_score(predict(model, adapted, val, zeros(val)), val.labels)
    for epoch in range(1, loop.epochs + 1):
        model.train()
        for idx in _batches(len(train), cfg.batch_size, gen):
            with adapted.routing(torch.zeros(len(idx), dtype=torch.long)):
                loss = F.binary_cross_entropy_with_logits(model(train.x[idx]), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = None if val is None or not len(val) else _val_score(
            predict(model, adapted, val, zeros(val)), val.labels)
        result.history.append(score)
        if score is None or best is None or score > best:
            best, best_state, result.best_epoch = score, adapted.state_for(domain), epoch
        elif loop.patience and epoch - result.best_epoch >= loop.patience:
            break
    adapted.load_state_for(domain, best_state)
    result.state, result.train_samples = best_state, len(train)
    for split in SPLITS:
        f = splits.get(split)
        if f is not None and len(f):
            result.metrics[split] = compare(predict(head, None, f), predict(model, adapted, f, zeros(f)),
                                            f.labels)
    return result


def train_mlora(head: Head, lora: LoraConfig, vocab: list[str], domains: list[str],
                splits: dict[str, Features], cfg: AdaptTrainConfig, loop: LoopConfig) -> list[DomainResult]:
    """:func:`train_mlora_domain` for each of ``domains`` (ids into ``vocab``) on its own rows."""
    return [train_mlora_domain(head, lora, d, {s: f.of_domain(vocab.index(d)) for s, f in splits.items()},
                               cfg, loop) for d in domains]


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
    best: dict[str, float | None] = dict.fromkeys(domains)
    active, gen = set(domains), torch.Generator().manual_seed(domain_seed(loop.seed, "multilora"))
    train = part["train"]
    for epoch in range(1, loop.epochs + 1):
        keep = torch.tensor([domains[s] in active for s in slots["train"].tolist()], dtype=torch.bool)
        rows = torch.nonzero(keep).squeeze(1)
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
        val = part.get("validation")
        probs = predict(model, adapted, val, slots["validation"], aux_col) if val is not None else None
        for k, d in enumerate(domains):
            if d not in active:
                continue
            m = slots["validation"] == k if val is not None else None
            score = None if m is None or not m.any() else _val_score(probs[m], val.labels[m])
            results[d].history.append(score)
            if score is None or best[d] is None or score > best[d]:
                best[d], results[d].state, results[d].best_epoch = score, adapted.state_for(d), epoch
            elif loop.patience and epoch - results[d].best_epoch >= loop.patience:
                active.discard(d)
        if not active:
            break
    for d in domains:
        adapted.load_state_for(d, results[d].state)
        results[d].train_samples = int((slots["train"] == domains.index(d)).sum())
    for split in SPLITS:
        f = part.get(split)
        if f is None or not len(f):
            continue
        base, mine = predict(head, None, f), predict(model, adapted, f, slots[split], aux_col)
        for k, d in enumerate(domains):
            m = slots[split] == k
            if m.any():
                results[d].metrics[split] = compare(base[m], mine[m], f.labels[m])
    return [results[d] for d in domains], adapted.shared_state()
