"""The shard format: Arrow IPC files with random access by row, plus a manifest written last.

A dataset at URL ``U`` is::

    U/shards/shard-00000.arrow   one uncompressed record batch (memory-mappable), rows_per_shard rows
    U/shards/shard-00001.arrow   ... every shard but the last holds exactly rows_per_shard rows
    U/manifest.json              sample count, schema, per-shard rows/bytes/sha256 (written last)

Every shard has an int64 ``id`` column equal to the global sample index (0..n-1), so sample ``i``
lives in shard ``i // rows_per_shard`` at row ``i % rows_per_shard``. Columns keep their dtype and
trailing shape: a ``float32[n, 32]`` column is stored as ``fixed_size_list<float32, 32>``.
A reader trusts a dataset only through its manifest (DESIGN invariant 5).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from orchestrator.storage import Storage, StorageError

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
FORMAT = "arrow-ipc"
VERSION = 1
ID = "id"
DEFAULT_ROWS_PER_SHARD = 8192


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupt (checksum mismatch). The message names the shard."""


@dataclass(frozen=True)
class ShardInfo:
    name: str          # relative to the dataset root, e.g. "shards/shard-00000.arrow"
    start: int         # id of its first row
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    url: str
    num_samples: int
    rows_per_shard: int
    schema: dict[str, dict[str, Any]]   # column -> {"dtype": "float32", "shape": [32]}
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def row_bytes(self) -> int:
        """Exact bytes of one sample across all columns (fixed shapes make this exact)."""
        return sum(np.dtype(c["dtype"]).itemsize * math.prod(c["shape"]) for c in self.schema.values())

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("url")
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, url: str) -> "Manifest":
        try:
            d = json.loads(text)
            shards = [ShardInfo(**s) for s in d.pop("shards")]
            m = cls(url=url, shards=shards, **d)
        except (ValueError, TypeError, KeyError) as e:
            raise ShardError(f"{url}/{MANIFEST}: not a valid dataset manifest ({e})") from None
        if m.format != FORMAT or m.version != VERSION:
            raise ShardError(f"{url}/{MANIFEST}: unsupported format {m.format!r} v{m.version}")
        expected = sum(s.rows for s in m.shards)
        if expected != m.num_samples:
            raise ShardError(f"{url}/{MANIFEST}: shards hold {expected} rows but num_samples is {m.num_samples}")
        for i, s in enumerate(m.shards):
            if s.start != i * m.rows_per_shard or (i < len(m.shards) - 1 and s.rows != m.rows_per_shard):
                raise ShardError(f"{url}/{MANIFEST}: shard {s.name} breaks the fixed rows_per_shard layout")
        return m


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """Load and check a dataset's manifest. Raises ShardError (no/invalid manifest) naming the URL."""
    st = Storage(url, storage_options)
    try:
        text = st.read_text(MANIFEST)
    except StorageError:
        raise ShardError(f"no dataset at {url}: {st.url(MANIFEST)} not found "
                         f"(write one with `orchestrator data write`)") from None
    return Manifest.from_json(text, url)


# ---------------------------------------------------------------------------------------------
# columns <-> arrow
# ---------------------------------------------------------------------------------------------
def _to_arrow(name: str, a: np.ndarray) -> pa.Array:
    if a.dtype.kind not in "biuf":
        raise ValueError(f"column {name!r}: dtype {a.dtype} is not supported "
                         f"(use bool, integer or floating arrays)")
    a = np.ascontiguousarray(a)
    flat = pa.array(a.reshape(-1))
    width = math.prod(a.shape[1:])
    if a.ndim == 1:
        return flat
    return pa.FixedSizeListArray.from_arrays(flat, width)


def column_view(arr: pa.Array, dtype: str, shape: list[int]) -> np.ndarray:
    """A numpy view ``[rows, *shape]`` over an Arrow column (zero-copy for numeric types)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type) and arr.null_count == 0:
        # the child values sliced by hand: flatten() + to_numpy() costs ~0.3 s per 32 MiB shard
        width = arr.type.list_size
        flat = arr.values.slice(arr.offset * width, len(arr) * width)
    else:
        flat = arr.flatten() if pa.types.is_fixed_size_list(arr.type) else arr
    try:
        np_flat = flat.to_numpy(zero_copy_only=True)
    except pa.ArrowInvalid:  # bool (bit-packed) and nullable columns need a copy
        np_flat = flat.to_numpy(zero_copy_only=False)
    return np_flat.reshape((len(arr), *shape)).astype(dtype, copy=False)


def _check_columns(cols: dict[str, np.ndarray], where: str) -> int:
    if not isinstance(cols, dict) or not cols:
        raise ValueError(f"{where}: expected a non-empty dict of column name -> numpy array")
    if ID in cols:
        raise ValueError(f"{where}: column {ID!r} is reserved (the writer adds the global sample index)")
    n = None
    for k, v in cols.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{where}: column names must be non-empty strings, got {k!r}")
        if not isinstance(v, np.ndarray) or v.ndim < 1:
            raise ValueError(f"{where}: column {k!r} must be a numpy array with a leading sample axis")
        if n is None:
            n = len(v)
        elif len(v) != n:
            raise ValueError(f"{where}: column {k!r} has {len(v)} rows, expected {n} like the others")
    return int(n)


def _schema_of(cols: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in cols.items()}


# ---------------------------------------------------------------------------------------------
# sources: anything -> chunks of columns
# ---------------------------------------------------------------------------------------------
def _torch_item_columns(item) -> dict[str, np.ndarray]:
    import torch

    def arr(v):
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().numpy()
        return np.asarray(v)

    if isinstance(item, dict):
        return {str(k): arr(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        names = ["x", "y"] if len(item) == 2 else [f"c{i}" for i in range(len(item))]
        return dict(zip(names, (arr(v) for v in item)))
    return {"x": arr(item)}


def _torch_chunks(ds, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(ds)
    for lo in range(0, n, chunk):
        items = [_torch_item_columns(ds[i]) for i in range(lo, min(n, lo + chunk))]
        keys = list(items[0])
        for j, it in enumerate(items):
            if list(it) != keys:
                raise ValueError(f"torch Dataset item {lo + j} has fields {list(it)}, expected {keys}")
        yield {k: np.stack([it[k] for it in items]) for k in keys}


def _parquet_chunks(url: str, storage_options, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    st = Storage(url, storage_options)
    if url.rstrip("/").endswith(".parquet"):
        files = [(Storage(_parent(url), storage_options), url.rstrip("/").rsplit("/", 1)[-1])]
    else:
        files = [(st, f) for f in st.walk_files() if f.endswith(".parquet")]
        if not files:
            raise ValueError(f"source {url!r}: no .parquet files found")
    for fst, rel in files:
        with fst.open_read(rel) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=chunk):
                yield {name: _parquet_column(batch.column(i), f"{fst.url(rel)} column {name!r}")
                       for i, name in enumerate(batch.schema.names)}


def _parent(url: str) -> str:
    from orchestrator.storage import parent
    return parent(url)


def _parquet_column(col: pa.Array, where: str) -> np.ndarray:
    if col.null_count:
        raise ValueError(f"{where}: has {col.null_count} nulls; shards need dense numeric columns")
    t = col.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if pa.types.is_fixed_size_list(t):
            width = t.list_size
        else:
            lengths = pc_lengths(col)
            if len(lengths) and (lengths.min() != lengths.max()):
                raise ValueError(f"{where}: lists of different lengths ({lengths.min()}..{lengths.max()}); "
                                 f"shards need a fixed trailing shape")
            width = int(lengths[0]) if len(lengths) else 0
        inner = _parquet_column(col.flatten(), where)
        return inner.reshape((len(col), width, *inner.shape[1:]))
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise ValueError(f"{where}: type {t} is not supported (numeric or fixed-length lists of numerics)")
    return col.to_numpy(zero_copy_only=False)


def pc_lengths(col: pa.Array) -> np.ndarray:
    import pyarrow.compute as pc
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def _source_chunks(source, storage_options, chunk: int) -> tuple[Iterator[dict[str, np.ndarray]], int | None]:
    """(chunks, total rows if known)."""
    if isinstance(source, str):
        return _parquet_chunks(source, storage_options, chunk), None
    if isinstance(source, dict):
        n = _check_columns(source, "columns")
        return (({k: v[lo:lo + chunk] for k, v in source.items()} for lo in range(0, n, chunk)), n)
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, (list, tuple)):
        return _torch_chunks(source, chunk), len(source)
    if isinstance(source, Iterable):
        return iter(source), None
    raise ValueError(f"source: expected dict of numpy arrays, an iterable of such dicts, a map-style "
                     f"torch Dataset or a Parquet URL; got {type(source).__name__}")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def encode_shard(cols: dict[str, np.ndarray], start: int) -> bytes:
    """One shard as Arrow IPC file bytes (a single uncompressed record batch)."""
    n = len(next(iter(cols.values())))
    arrays = [pa.array(np.arange(start, start + n, dtype=np.int64))]
    names = [ID]
    for k, v in cols.items():
        arrays.append(_to_arrow(k, v))
        names.append(k)
    batch = pa.RecordBatch.from_arrays(arrays, names=names)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def write_shards(source, url: str, *, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                 storage_options: dict | None = None, progress: bool = True) -> Manifest:
    """Write ``source`` as shards plus a manifest at ``url`` and return the manifest.

    ``source``: ``dict[str, np.ndarray]`` (equal leading dimension), an iterable of such dicts
    (chunks), a map-style torch Dataset (items: dict, (x, y) tuple or a tensor), or the URL of a
    Parquet file or directory. An int64 ``id`` column (global sample index) is added. Shards go first
    and the manifest last, so a crash leaves no manifest pointing at missing shards.
    Raises ValueError naming the argument or column that is wrong.
    """
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
    st = Storage(url, storage_options)
    chunks, total = _source_chunks(source, storage_options, rows_per_shard)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="samples", desc=f"writing {url}", disable=not progress)

    schema: dict[str, dict[str, Any]] | None = None
    shards: list[ShardInfo] = []
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    written = 0

    def flush(cols_list: list[dict[str, np.ndarray]]):
        nonlocal written
        cols = {k: np.concatenate([c[k] for c in cols_list]) for k in cols_list[0]} if len(cols_list) > 1 \
            else cols_list[0]
        rows = len(next(iter(cols.values())))
        name = f"{SHARD_DIR}/shard-{len(shards):05d}.arrow"
        data = encode_shard(cols, written)
        st.write_bytes(name, data)
        shards.append(ShardInfo(name=name, start=written, rows=rows, bytes=len(data),
                                sha256=hashlib.sha256(data).hexdigest()))
        written += rows
        bar.update(rows)

    for i, chunk in enumerate(chunks):
        n = _check_columns(chunk, f"source chunk {i}")
        sch = _schema_of(chunk)
        if schema is None:
            schema = sch
        elif sch != schema:
            raise ValueError(f"source chunk {i}: schema {sch} differs from the first chunk's {schema}")
        for k, c in schema.items():
            if np.dtype(c["dtype"]).kind not in "biuf":
                raise ValueError(f"source chunk {i}: column {k!r} dtype {c['dtype']} is not supported "
                                 f"(use bool, integer or floating arrays)")
        lo = 0
        while lo < n:
            take = min(rows_per_shard - pending_rows, n - lo)
            pending.append({k: v[lo:lo + take] for k, v in chunk.items()})
            pending_rows += take
            lo += take
            if pending_rows == rows_per_shard:
                flush(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        flush(pending)
    bar.close()
    if schema is None or written == 0:
        raise ValueError("source: no samples to write")
    manifest = Manifest(url=url, num_samples=written, rows_per_shard=rows_per_shard,
                        schema={ID: {"dtype": "int64", "shape": []}, **schema}, shards=shards)
    st.write_text(MANIFEST, manifest.to_json())
    return manifest


# ---------------------------------------------------------------------------------------------
# reading one shard
# ---------------------------------------------------------------------------------------------
class ShardReader:
    """Zero-copy numpy views (``columns``) over one memory-mapped (or in-memory) shard."""

    def __init__(self, source: pa.NativeFile | pa.Buffer, info: ShardInfo, schema: dict, where: str):
        try:
            reader = pa.ipc.open_file(source)
            table = reader.read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"shard {where}: unreadable Arrow IPC file ({e})") from None
        if table.num_rows != info.rows:
            raise ShardError(f"shard {where}: has {table.num_rows} rows, manifest says {info.rows}")
        self.info = info
        self.columns: dict[str, np.ndarray] = {}
        for name, c in schema.items():
            if name not in table.column_names:
                raise ShardError(f"shard {where}: column {name!r} missing")
            self.columns[name] = column_view(table.column(name), c["dtype"], c["shape"])


def sha256_of_path(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 22)
        view = memoryview(buf)
        while True:
            k = f.readinto(buf)
            if not k:
                return h.hexdigest()
            h.update(view[:k])


def sha256_of_stream(f: io.RawIOBase, out) -> str:
    """Copy ``f`` into ``out`` while hashing it."""
    h = hashlib.sha256()
    while True:
        b = f.read(1 << 22)
        if not b:
            return h.hexdigest()
        h.update(b)
        out.write(b)
