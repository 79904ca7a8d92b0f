"""Every shard of a dataset mapped side by side in one virtual address range (Linux).

A global shuffle draws each batch from every shard. Gathering shard by shard costs a handful of
numpy calls per shard per column and a second copy to put rows back in order. With the shards at
fixed strides of one address range, a column whose rows sit at the same offset modulo the row size
in every shard is one strided array over the whole range, and a batch is one fancy-indexing copy
from it (docs/BENCHMARKS.md, Data loader).

The range is reserved up front (``PROT_NONE``, no memory is committed) and each shard file is
mapped read-only into its slot with ``MAP_FIXED`` when the store opens it. The mapping lives as
long as any buffer handed out from it.

Slots of shards of 2 MiB and more start on 2 MiB boundaries and are marked ``MADV_HUGEPAGE``:
the kernel maps a shard's page cache in 2 MiB entries where the cache holds it in 2 MiB folios
(always for pages this mapping reads in itself; for pages already cached, whatever size they
were read in). Each random row then costs fewer TLB misses (docs/BENCHMARKS.md, Data loader,
"Rerun 2026-11-30").
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np
import pyarrow as pa

_MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE, _PROT_NONE = 0x10, 0x20, 0x4000, 0
_HUGE = 2 << 20
_MADV_HUGEPAGE, _MADV_POPULATE_READ = 14, 22
POPULATE = getattr(mmap, "MAP_POPULATE", 0)

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _libc = None


def available() -> bool:
    return _libc is not None


class ShardRegion:
    """One slot per shard, each as large as the largest shard (page-rounded), in one range."""

    def __init__(self, shard_bytes: list[int]):
        if _libc is None:
            raise OSError("shard regions need Linux mmap(MAP_FIXED)")
        # Slots start on 2 MiB boundaries (for shards of 2 MiB and more), so the kernel can map a
        # shard's large page-cache folios with one huge-page entry each instead of 512 small ones:
        # fewer TLB misses for the random row reads of a global shuffle.
        align = _HUGE if max(shard_bytes) >= _HUGE else mmap.PAGESIZE
        self.slot = max(align, -(-max(shard_bytes) // align) * align)
        self.size = self.slot * len(shard_bytes)
        self._reserved = self.size + align - mmap.PAGESIZE
        addr = _libc.mmap(None, self._reserved, _PROT_NONE, mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                          -1, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), f"could not reserve {self.size} bytes of address space")
        self._reserved_at = addr
        self.base = -(-addr // align) * align
        # a view over the whole range; touching an unmapped slot would fault, and nothing does
        self.bytes = np.frombuffer((ctypes.c_uint8 * self.size).from_address(self.base), np.uint8)

    def map(self, i: int, path: str, populate: bool) -> pa.Buffer:
        """Map ``path`` read-only into slot ``i``; ``populate`` maps every page now."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if not 0 < size <= self.slot:
                raise OSError(f"{path}: {size} bytes does not fit a {self.slot}-byte shard slot")
            at = self.base + i * self.slot
            got = _libc.mmap(at, size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            if got != at:
                raise OSError(ctypes.get_errno(), f"mmap of {path} into its shard slot failed")
            if self.slot % _HUGE == 0:
                _libc.madvise(at, size, _MADV_HUGEPAGE)  # a hint: fine to fail (no THP)
            # map every page now (after the hint, so pages read in come in 2 MiB folios);
            # kernels before 5.14 lack MADV_POPULATE_READ: map the file again with MAP_POPULATE
            if populate and _libc.madvise(at, size, _MADV_POPULATE_READ) != 0 and POPULATE:
                flags = mmap.MAP_SHARED | _MAP_FIXED | POPULATE
                if _libc.mmap(at, size, mmap.PROT_READ, flags, fd, 0) != at:
                    raise OSError(ctypes.get_errno(), f"mmap of {path} into its shard slot failed")
        finally:
            os.close(fd)
        return pa.foreign_buffer(at, size, base=self)

    def unmap(self, i: int) -> None:
        """Return slot ``i`` to reserved, unmapped address space (its file's pages are let go)."""
        at = self.base + i * self.slot
        flags = mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED
        if _libc.mmap(at, self.slot, _PROT_NONE, flags, -1, 0) != at:
            raise OSError(ctypes.get_errno(), f"could not unmap shard slot {i}")

    def rows(self, offset: int, row_bytes: int) -> tuple[np.ndarray, int]:
        """The whole range as rows of ``row_bytes`` starting at byte ``offset % row_bytes``, in
        the widest unsigned type that keeps them aligned; and that start."""
        start = offset % row_bytes
        unit = next(u for u in (8, 4, 2, 1) if row_bytes % u == 0 and start % u == 0)
        n = (self.size - start) // row_bytes
        view = self.bytes[start:start + n * row_bytes].view(f"u{unit}").reshape(n, row_bytes // unit)
        return view, start

    def __del__(self):
        if getattr(self, "_reserved_at", None) and _libc is not None:
            _libc.munmap(self._reserved_at, self._reserved)
