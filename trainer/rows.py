"""Where adapter training and evaluation get their rows: held in memory, or read from storage a
block at a time so that a task's memory is bounded by a buffer, not by its rows. No I/O here.

Letters: N rows of one domain and split, R rows of a block, U rows of a domain's shuffle buffer.

A task whose rows fit under ``AdaptTrainConfig.buffer_rows`` holds them (:class:`Held`, the
in-memory path: each epoch is a seeded permutation of all N rows). A larger task gets each
domain's rows of each split as :class:`DomainBlocks` — block sizes and a function that reads one
block (the feature cache, :mod:`mdlora.infra.features`, supplies it; files and s3 stay there):

* Training (:class:`Shuffled`): an epoch reads the domain's blocks in a seeded random order into a
  buffer of at most U rows; when the next block does not fit, the buffer is permuted (same
  generator) and served as batches, and the fewer-than-a-batch rows left over stay for the next
  fill. Every row is served exactly once an epoch, and the order is a function of the
  generator's seed alone (the domain's ``domain_seed``), wherever the domain runs. It is not the
  in-memory order, so the two paths agree statistically, not bitwise (README "Adapting at scale").
* Evaluation (:class:`StreamedRows`): blocks in order, one at a time; a pass keeps only each
  row's probability; labels and domain ids (12 bytes a row) are kept once read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mdlora.trainer.features import Features

BLOCKS_PER_BUFFER = 8
"""A full buffer mixes at least this many blocks: a batch draws from that many places of the
domain's rows, not from one contiguous stretch of a file."""


class TrainRows(Protocol):
    """One domain's training rows, served an epoch at a time in seeded batches."""

    def __len__(self) -> int: ...

    def epoch(self, batch_size: int, gen: torch.Generator) -> Iterator[Features]:
        """Batches of ``batch_size`` rows (the last one smaller) visiting every row once."""
        ...


def batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    """A seeded permutation of ``range(n)`` cut into index batches of ``size``."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + size] for i in range(0, n, size)]


@dataclass
class Held:
    """Training rows held in memory: ``feats`` rows ``rows`` (an index [N])."""

    feats: Features
    rows: Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, batch_size: int, gen: torch.Generator) -> Iterator[Features]:
        """A permutation of all N rows in batches (drawn from ``gen`` at the first batch)."""
        for idx in batches(len(self.rows), batch_size, gen):
            yield self.feats.select(self.rows[idx])


@dataclass
class DomainBlocks:
    """One domain's rows of one split on storage: block i has ``sizes[i]`` rows, ``read(i)``."""

    domain: int
    """Its id into the domain vocabulary (every row's ``domains`` value)."""
    sizes: list[int]
    read: Callable[[int], Features]

    def __len__(self) -> int:
        return sum(self.sizes)


def domain_buffer(buffer_rows: int, batch_size: int, pack: int) -> int:
    """U: each of a pack's domains streams through its share of ``buffer_rows`` (two batches at
    least, so that a block and a batch's leftover fit)."""
    return max(2 * batch_size, buffer_rows // pack)


def block_rows(buffer_rows: int, batch_size: int, pack: int) -> int:
    """R for a task's ``buffer_rows``: :data:`BLOCKS_PER_BUFFER` blocks fill a domain's buffer, and
    a block fits beside a leftover of less than a batch."""
    u = domain_buffer(buffer_rows, batch_size, pack)
    return max(1, min(u // BLOCKS_PER_BUFFER, u - batch_size))


class Shuffled:
    """One domain's training rows read block by block through a seeded shuffle buffer.

    Args:
        blocks: the rows (blocks of at most ``buffer_rows - batch_size`` rows keep the bound).
        buffer_rows: U, the most rows held at once (:attr:`peak` records the most held).
    """

    def __init__(self, blocks: DomainBlocks, buffer_rows: int) -> None:
        self.blocks, self.buffer_rows, self.peak = blocks, buffer_rows, 0

    def __len__(self) -> int:
        return len(self.blocks)

    def epoch(self, batch_size: int, gen: torch.Generator) -> Iterator[Features]:
        """Blocks in a seeded order, filled into the buffer, each full buffer permuted and served."""
        held: list[Features] = []
        for i in torch.randperm(len(self.blocks.sizes), generator=gen).tolist():
            if held and sum(map(len, held)) + self.blocks.sizes[i] > self.buffer_rows:
                held = yield from self._serve(held, batch_size, gen, last=False)
            held.append(self.blocks.read(i))
            self.peak = max(self.peak, sum(map(len, held)))
        if held:
            yield from self._serve(held, batch_size, gen, last=True)

    @staticmethod
    def _serve(held: list[Features], batch_size: int, gen: torch.Generator,
               last: bool) -> Iterator[Features]:
        """The held rows permuted, in batches; returns the leftover (< a batch) unless ``last``."""
        rows = Features.cat(held) if len(held) > 1 else held[0]
        perm = torch.randperm(len(rows), generator=gen)
        served = len(rows) if last else len(rows) // batch_size * batch_size
        for lo in range(0, served, batch_size):
            yield rows.select(perm[lo:min(lo + batch_size, served)])
        return [rows.select(perm[served:])] if served < len(rows) else []


class StreamedRows:
    """Rows of one split of several domains (``parts`` in order), read a block at a time.

    Args:
        parts: one :class:`DomainBlocks` per domain.
        keep: bool [sum of the parts' rows]: the rows that count (None: all).
    """

    def __init__(self, parts: list[DomainBlocks], keep: Tensor | None = None) -> None:
        self.parts, self.keep = parts, keep
        every = torch.cat([torch.full((len(p),), p.domain, dtype=torch.long) for p in parts]) if parts else \
            torch.zeros(0, dtype=torch.long)
        self.domains = every if keep is None else every[keep]
        self._labels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.domains)

    @property
    def labels(self) -> Tensor:
        """float32 [N] (read by one pass, then kept)."""
        if self._labels is None:
            self._labels = torch.cat([c.labels for c in self.chunks()]) if len(self) else torch.zeros(0)
        return self._labels

    def chunks(self) -> Iterator[Features]:
        """The kept rows of each block, block by block."""
        lo = 0
        for p in self.parts:
            for i, n in enumerate(p.sizes):
                if self.keep is None or self.keep[lo:lo + n].any():
                    block = p.read(i)
                    yield block if self.keep is None else block.select(self.keep[lo:lo + n])
                lo += n

    def where(self, keep: Tensor) -> StreamedRows:
        """The rows where ``keep`` [N] is True, in order (same blocks, a narrower mask)."""
        if self.keep is None:
            return StreamedRows(self.parts, keep.clone())
        full = self.keep.clone()
        full[self.keep] = keep
        return StreamedRows(self.parts, full)
