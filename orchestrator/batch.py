"""The batch rule (DESIGN invariant 4): which worker counts split a job's global batch, and how.

Spec validation, the scheduler, the trainer's scaling policy, its DeepSpeed config and the data
loader all ask this module, so they cannot disagree: ``w`` workers may run a job iff
``global_batch % (micro_batch * w) == 0``; each then runs ``global / (micro * w)`` accumulation steps.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

# The spec field a batch without any split is reported against.
FIELD = "deepspeed.global_batch_size"


class NoSplit(ValueError):
    """No worker count in ``[min_workers, max_workers]`` splits the global batch; ``field`` names
    the spec field to blame."""

    def __init__(self, message: str, field: str = FIELD):
        super().__init__(message)
        self.field = field


def splits(global_batch: int, micro_batch: int, workers: int) -> bool:
    """Whether ``workers`` ranks of ``micro_batch`` samples make up ``global_batch`` exactly."""
    return workers >= 1 and micro_batch >= 1 and global_batch % (micro_batch * workers) == 0


def accumulation(global_batch: int, micro_batch: int, workers: int) -> int:
    """Accumulation steps keeping ``global = workers x micro x accumulation``.

    Raises ValueError naming the numbers when no integer split exists.
    """
    if workers < 1 or micro_batch < 1:
        raise ValueError(f"workers ({workers}) and micro_batch ({micro_batch}) must be >= 1")
    if not splits(global_batch, micro_batch, workers):
        raise ValueError(
            f"global batch {global_batch} cannot be split over {workers} workers x micro-batch "
            f"{micro_batch}: {global_batch} % {micro_batch * workers} != 0")
    return global_batch // (micro_batch * workers)


@functools.lru_cache(maxsize=4096)
def _allowed(global_batch: int, micro_batch: int, lo: int, hi: int) -> tuple[int, ...]:
    return tuple(w for w in range(lo, hi + 1) if splits(global_batch, micro_batch, w))


@dataclass(frozen=True)
class BatchPlan:
    """A job's batch geometry and the worker counts in ``[min_workers, max_workers]`` that keep it.

    Raises :class:`NoSplit` (a ValueError naming ``deepspeed.global_batch_size``) when no count
    in the range splits the global batch, and ValueError for non-positive sizes or min > max.
    """
    global_batch_size: int
    micro_batch_size: int
    min_workers: int = 1
    max_workers: int = 1
    allowed: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("global_batch_size", "micro_batch_size", "min_workers", "max_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= max_workers ({self.max_workers})")
        ok = _allowed(self.global_batch_size, self.micro_batch_size, self.min_workers, self.max_workers)
        if not ok:
            raise NoSplit(
                f"{FIELD} ({self.global_batch_size}) is not divisible by micro_batch_size x workers "
                f"({self.micro_batch_size} x w) for any allowed worker count w in "
                f"[{self.min_workers}, {self.max_workers}]")
        object.__setattr__(self, "allowed", ok)

    @classmethod
    def of(cls, spec) -> "BatchPlan":
        """The plan of a train spec (anything with ``deepspeed`` and ``resources`` sections)."""
        ds, r = spec.deepspeed, spec.resources
        return cls(ds.global_batch_size, ds.micro_batch_size, r.min_workers, r.max_workers)

    @property
    def min_allowed(self) -> int:
        return self.allowed[0]

    @property
    def max_allowed(self) -> int:
        return self.allowed[-1]

    def is_allowed(self, workers: int) -> bool:
        return workers in self.allowed

    def largest_allowed_at_most(self, n: int) -> int | None:
        """The largest allowed count <= ``n``; None when even the smallest is larger."""
        i = bisect.bisect_right(self.allowed, n)
        return self.allowed[i - 1] if i else None

    def accumulation(self, workers: int) -> int:
        """Accumulation steps on ``workers`` ranks; ValueError unless ``workers`` is allowed."""
        self._check(workers)
        return accumulation(self.global_batch_size, self.micro_batch_size, workers)

    def per_rank(self, workers: int) -> int:
        """Samples each of ``workers`` ranks reads per global step; ValueError unless allowed."""
        self._check(workers)
        return self.global_batch_size // workers

    def _check(self, workers: int) -> None:
        if workers in self.allowed:
            return
        accumulation(self.global_batch_size, self.micro_batch_size, workers)  # raises if no split
        raise ValueError(f"{workers} workers is outside [{self.min_workers}, {self.max_workers}]; "
                         f"allowed worker counts are {list(self.allowed)}")
