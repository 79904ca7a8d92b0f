"""Which positions each rank reads at each global step: pure arithmetic over a small cursor.

The stream is cut into global batches of G positions. Global step positions never depend on the
world size; rank ``r`` of ``W`` reads the contiguous slice ``[r*G/W, (r+1)*G/W)`` of the step and
splits it into ``accumulation = G / (micro*W)`` micro-batches. So resuming on any world size is
continuing the same stream from the same cursor.

Tail handling (``Shuffle.tail``):

* ``drop``: an epoch yields ``n // G`` steps; its last ``n % G`` positions are never read.
* ``carry``: the stream is epoch 0's order, then epoch 1's, ...; a step may straddle two epochs,
  and no sample is dropped.

A cursor is normalised so that ``consumed`` is always the start of a readable step: after the last
full step of a ``drop`` epoch it reads ``(epoch + 1, 0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.data.shuffle import EpochOrder
from orchestrator import batch

TAILS = ("drop", "carry")


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    consumed: int = 0   # samples of ``epoch`` consumed, at a global-step boundary


def check_batch(global_batch_size: int, micro_batch_size: int, world_size: int, rank: int,
                num_samples: int, tail: str) -> int:
    """Validate the batch geometry by the one batch rule (:mod:`orchestrator.batch`); return the
    accumulation. Raises ValueError naming the values."""
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                    ("world_size", world_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if not batch.splits(int(global_batch_size), int(micro_batch_size), int(world_size)):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size "
            f"({micro_batch_size}) x world_size ({world_size}) = {micro_batch_size * world_size}")
    if tail not in TAILS:
        raise ValueError(f"shuffle.tail must be one of {TAILS}, got {tail!r}")
    if tail == "drop" and global_batch_size > num_samples:
        raise ValueError(f"global_batch_size ({global_batch_size}) exceeds the dataset's {num_samples} "
                         f"samples: with shuffle.tail='drop' no step fits in an epoch")
    return batch.accumulation(int(global_batch_size), int(micro_batch_size), int(world_size))


def normalise(c: Cursor, n: int, g: int, tail: str) -> Cursor:
    epoch, consumed = c.epoch + c.consumed // n, c.consumed % n
    if tail == "drop" and consumed + g > n:
        epoch, consumed = epoch + 1, 0
    return Cursor(epoch, consumed)


def advance(c: Cursor, n: int, g: int, tail: str, steps: int = 1) -> Cursor:
    """The cursor ``steps`` global steps after ``c``."""
    c = normalise(c, n, g, tail)
    if tail == "carry":
        return normalise(Cursor(c.epoch, c.consumed + steps * g), n, g, tail)
    per_epoch = n // g
    done = c.consumed // g + steps if c.consumed % g == 0 else None
    if done is not None:
        return normalise(Cursor(c.epoch + done // per_epoch, (done % per_epoch) * g), n, g, tail)
    for _ in range(steps):  # consumed not a multiple of g: a state saved under another global batch
        c = normalise(Cursor(c.epoch, c.consumed + g), n, g, tail)
    return c


def step_segments(c: Cursor, n: int, g: int, tail: str, lo: int = 0, hi: int | None = None
                  ) -> list[tuple[int, int, int]]:
    """``(epoch, start, end)`` position ranges holding offsets ``[lo, hi)`` of the step at ``c``."""
    c = normalise(c, n, g, tail)
    hi = g if hi is None else hi
    out = []
    epoch, pos = c.epoch, c.consumed + lo
    epoch, pos = epoch + pos // n, pos % n
    left = hi - lo
    while left > 0:
        take = min(left, n - pos)
        out.append((epoch, pos, pos + take))
        left -= take
        epoch, pos = epoch + 1, 0
    return out


def rank_segments(c: Cursor, n: int, g: int, tail: str, rank: int, world: int
                  ) -> list[tuple[int, int, int]]:
    per_rank = g // world
    return step_segments(c, n, g, tail, rank * per_rank, (rank + 1) * per_rank)


def segment_ids(order: EpochOrder, segments: list[tuple[int, int, int]]) -> np.ndarray:
    """The sample ids at these ``(epoch, start, end)`` ranges, concatenated: one ``order.ids`` call
    per epoch however many ranges there are."""
    if not segments:
        return np.zeros(0, dtype=np.int64)
    offs = np.cumsum([0] + [b - a for _, a, b in segments])
    out = np.empty(int(offs[-1]), dtype=np.int64)
    for epoch in {e for e, _, _ in segments}:
        mine = [i for i, (e, _, _) in enumerate(segments) if e == epoch]
        positions = np.concatenate([np.arange(segments[i][1], segments[i][2], dtype=np.int64) for i in mine])
        out[np.concatenate([np.arange(offs[i], offs[i + 1]) for i in mine])] = order.ids(epoch, positions)
    return out


def step_index(c: Cursor, n: int, g: int, tail: str) -> int:
    """The step at ``c`` counted from the start of epoch 0: the clock loaders plan shard use by."""
    c = normalise(c, n, g, tail)
    if tail == "carry":
        return (c.epoch * n + c.consumed) // g
    return c.epoch * (n // g) + c.consumed // g


def epoch_of_step(step: int, n: int, g: int, tail: str) -> int:
    return step * g // n if tail == "carry" else step // (n // g)


def shard_steps(order: EpochOrder, n: int, g: int, tail: str, epoch: int, lo: int, hi: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(shards, first_step, last_step)``: the steps (on the :func:`step_index` clock) during
    which a reader of step slots ``[lo, hi)`` may read each shard in ``epoch``."""
    shards, first, last = order.shard_uses(epoch, lo, hi)
    if tail == "carry":
        return shards, (epoch * n + first) // g, (epoch * n + last) // g
    per_epoch = n // g
    read = first < per_epoch * g  # the dropped tail is never read
    return (shards[read], epoch * per_epoch + first[read] // g,
            epoch * per_epoch + np.minimum(last[read], per_epoch * g - 1) // g)


class ShardSchedule:
    """When one reader (step slots ``[lo, hi)``) reads which shard, step by step: what to keep
    mapped now, and what to fetch next and in which order. Pure, from the order."""

    def __init__(self, order: EpochOrder, n: int, g: int, tail: str, lo: int, hi: int):
        self.order, self.n, self.g, self.tail, self.lo, self.hi = order, n, g, tail, lo, hi
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int):
        got = self._epochs.get(e)
        if got is None:
            if len(self._epochs) > 3:
                self._epochs.pop(min(self._epochs))
            got = self._epochs[e] = shard_steps(self.order, self.n, self.g, self.tail, e, self.lo, self.hi)
        return got

    def _around(self, step: int, epochs: int):
        e = epoch_of_step(step, self.n, self.g, self.tail)
        parts = [self._epoch(x) for x in range(max(0, e - 1), e + epochs)]  # carry: uses straddle epochs
        return tuple(np.concatenate(a) for a in zip(*parts))

    def needed(self, first: int, last: int) -> np.ndarray:
        """Shards read at any step in ``[first, last]``."""
        s, a, b = self._around(first, 2 + (last - first) * self.g // self.n)
        return np.unique(s[(a <= last) & (b >= first)])

    def upcoming(self, step: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(shards, next_use)``: up to ``limit`` shards in the order they are next needed from
        ``step`` on (within this epoch and the next), each once; a shard in use now has ``step``."""
        s, a, b = self._around(step, 2)
        live = b >= step
        s, a = s[live], np.maximum(a[live], step)
        o = np.lexsort((s, a))
        s, a = s[o], a[o]
        _, first = np.unique(s, return_index=True)
        first.sort()
        first = first[:limit]
        return s[first], a[first]
