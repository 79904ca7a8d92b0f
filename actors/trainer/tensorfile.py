"""Checkpoint shards in the safetensors layout, streamed and checksummed in one pass.

A shard is ``u64 little-endian header length | JSON header | raw tensor bytes``: the layout of
`safetensors <https://github.com/huggingface/safetensors>`_, so ``safetensors.torch.load_file`` (or
any safetensors reader) opens our shards too. We write it ourselves instead of calling that library
because a checkpoint save wants three things at once: no intermediate copy of the tensors (their
memory is handed straight to the file), a streaming write to any fsspec file (an S3 multipart upload
included), and the checksum computed on the same pass (xxh3-128: about 20 GB/s, so hashing costs a
fraction of the write; sha256 ran at 1.6 GB/s here, slower than the page cache it was guarding).

Tensor names are ``"<parameter>/<kind>"`` (``kind``: ``fp32``, ``exp_avg``, ...), nested back into
``{parameter: {kind: tensor}}`` by :func:`read_tensors`.
"""

from __future__ import annotations

import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import torch
import xxhash

CHECKSUM = "xxh3_128"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128(data).hexdigest()


_HASH_POOL: ThreadPoolExecutor | None = None
_OVERLAP_BYTES = 1 << 20


def _hash_pool() -> ThreadPoolExecutor:
    """The hashing helper thread, at normal priority whichever thread asks first (a thread
    inherits its creator's scheduling; an idle-priority writer must not leave it idle)."""
    from actors.warm import normal_thread_priority
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash")
    normal_thread_priority(pool.submit(threading.get_native_id).result())
    return pool


class _HashingWriter:
    """Writes through to ``f`` while hashing; a large buffer is hashed in a helper thread while it
    is written (xxhash releases the GIL), in order, so the checksum costs almost no wall time."""

    def __init__(self, f: BinaryIO):
        self.f, self.h, self.n = f, xxhash.xxh3_128(), 0

    def write(self, b) -> None:
        global _HASH_POOL
        mv = memoryview(b)
        if mv.nbytes >= _OVERLAP_BYTES:
            if _HASH_POOL is None:
                _HASH_POOL = _hash_pool()
            hashed = _HASH_POOL.submit(self.h.update, mv)
            try:
                self.f.write(mv)
            finally:
                hashed.result()
        else:
            self.h.update(mv)
            self.f.write(mv)
        self.n += mv.nbytes


def _flat(tensors: dict[str, dict[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name in sorted(tensors):
        for kind in sorted(tensors[name]):
            if "/" in kind:
                raise ValueError(f"tensor kind {kind!r} of {name!r} contains '/'")
            t = tensors[name][kind]
            if t.dtype not in _DTYPES:
                raise TypeError(f"cannot checkpoint {name}/{kind}: dtype {t.dtype} is not supported")
            out.append((f"{name}/{kind}", t.detach().cpu().contiguous()))
    return out


def write_tensors(f: BinaryIO, tensors: dict[str, dict[str, torch.Tensor]],
                  metadata: dict[str, str] | None = None) -> tuple[int, str]:
    """Stream ``{parameter: {kind: tensor}}`` to ``f``; returns (bytes written, xxh3-128 hex)."""
    flat = _flat(tensors)
    header: dict[str, Any] = {}
    off = 0
    for key, t in flat:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    w = _HashingWriter(f)
    w.write(struct.pack("<Q", len(hb)))
    w.write(hb)
    for _, t in flat:
        if t.numel():
            w.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy: the tensor's memory
    return w.n, w.h.hexdigest()


def read_header(f: BinaryIO, where: str = "shard") -> tuple[dict[str, Any], int]:
    """A shard's JSON header and the offset its tensor bytes start at (one small read)."""
    try:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    except (struct.error, ValueError) as e:
        raise ValueError(f"{where}: not a tensor shard ({e})") from None
    return header, 8 + hlen


def group(header: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """``{parameter: {kind: record}}`` of a header (records: dtype, shape, data_offsets)."""
    out: dict[str, dict[str, dict]] = {}
    for key, rec in header.items():
        if key != "__metadata__":
            name, _, kind = key.rpartition("/")
            out.setdefault(name, {})[kind] = rec
    return out


def dtype_of(rec: dict) -> torch.dtype:
    return _BY_NAME[rec["dtype"]]


def read_tensors(data: bytes | bytearray, where: str = "shard") -> dict[str, dict[str, torch.Tensor]]:
    """Parse a shard written by :func:`write_tensors` (or any safetensors file of such names)."""
    return read_shard(data, where)[0]


def read_shard(data: bytes | bytearray, where: str = "shard") -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                       dict[str, str]]:
    """:func:`read_tensors`, and the header's string metadata."""
    buf = data if isinstance(data, bytearray) else bytearray(data)  # writable: torch shares it
    try:
        (hlen,) = struct.unpack_from("<Q", buf, 0)
        header = json.loads(bytes(buf[8:8 + hlen]))
    except (struct.error, ValueError) as e:
        raise ValueError(f"{where}: not a tensor shard ({e})") from None
    base = 8 + hlen
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, rec in header.items():
        if key == "__metadata__":
            continue
        name, _, kind = key.rpartition("/")
        dtype = _BY_NAME[rec["dtype"]]
        b, e = rec["data_offsets"]
        if base + e > len(buf):
            raise ValueError(f"{where}: tensor {key} runs past the end of the file")
        n = (e - b) // torch.empty((), dtype=dtype).element_size()
        t = (torch.frombuffer(buf, dtype=dtype, count=n, offset=base + b) if n
             else torch.empty(0, dtype=dtype))
        out.setdefault(name, {})[kind] = t.reshape(rec["shape"])
    return out, header.get("__metadata__", {})
