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

TAILS = ("drop", "carry")


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    consumed: int = 0   # samples of ``epoch`` consumed, at a global-step boundary


def check_batch(global_batch_size: int, micro_batch_size: int, world_size: int, rank: int,
                num_samples: int, tail: str) -> int:
    """Validate the batch geometry; return the accumulation. Raises ValueError naming the values."""
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                    ("world_size", world_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if global_batch_size % (micro_batch_size * world_size):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a multiple of micro_batch_size "
            f"({micro_batch_size}) x world_size ({world_size}) = {micro_batch_size * world_size}")
    if tail not in TAILS:
        raise ValueError(f"shuffle.tail must be one of {TAILS}, got {tail!r}")
    if tail == "drop" and global_batch_size > num_samples:
        raise ValueError(f"global_batch_size ({global_batch_size}) exceeds the dataset's {num_samples} "
                         f"samples: with shuffle.tail='drop' no step fits in an epoch")
    return global_batch_size // (micro_batch_size * world_size)


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
