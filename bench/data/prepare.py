"""The benchmark's one synthetic dataset, written once per format: our Arrow shards (local and S3),
Parquet (Ray Data), MDS (MosaicML Streaming) and LitData chunks. Each sample: ``id`` int64 and
``x`` = ``sample_bytes`` random bytes."""

from __future__ import annotations

import os

import numpy as np

CHUNK = 8192


def chunks(samples: int, sample_bytes: int, seed: int = 0):
    for lo in range(0, samples, CHUNK):
        yield lo, _chunk(lo, samples, sample_bytes, seed)


def _chunk(lo: int, samples: int, sample_bytes: int, seed: int = 0) -> np.ndarray:
    """The rows from ``lo`` (one chunk): the same bytes whichever writer asks, in whatever order."""
    rng = np.random.default_rng([seed, lo])
    k = min(CHUNK, samples - lo)
    return np.frombuffer(rng.bytes(k * sample_bytes), dtype=np.uint8).reshape(k, sample_bytes)


def write_ours(url: str, samples: int, sample_bytes: int, rows_per_shard: int, storage_options=None):
    from actors.data import write_shards
    return write_shards(({"x": x} for _, x in chunks(samples, sample_bytes)), url,
                        rows_per_shard=rows_per_shard, storage_options=storage_options, progress=True)


def write_parquet(path: str, samples: int, sample_bytes: int, rows_per_file: int):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(path, exist_ok=True)
    writer, part = None, 0
    for lo, x in chunks(samples, sample_bytes):
        t = pa.table({"id": np.arange(lo, lo + len(x), dtype=np.int64),
                      "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), sample_bytes)})
        if writer is None or lo % rows_per_file == 0:
            if writer is not None:
                writer.close()
            writer = pq.ParquetWriter(os.path.join(path, f"part-{part:05d}.parquet"), t.schema,
                                      compression="none")
            part += 1
        writer.write_table(t, row_group_size=1024)
    writer.close()


def write_mds(path: str, samples: int, sample_bytes: int):
    from streaming import MDSWriter
    with MDSWriter(out=path, columns={"id": "int64", "x": "bytes"}, size_limit=1 << 25) as w:
        for lo, x in chunks(samples, sample_bytes):
            for i in range(len(x)):
                w.write({"id": lo + i, "x": x[i].tobytes()})


def write_litdata(path: str, samples: int, sample_bytes: int):
    import litdata
    litdata.optimize(fn=_LitChunk(samples, sample_bytes), inputs=list(range(0, samples, CHUNK)),
                     output_dir=path, chunk_bytes="32MB", num_workers=1, verbose=False)


class _LitChunk:
    def __init__(self, samples: int, sample_bytes: int):
        self.samples, self.sample_bytes = samples, sample_bytes

    def __call__(self, lo: int):
        x = _chunk(lo, self.samples, self.sample_bytes)
        for i in range(len(x)):
            yield {"id": lo + i, "x": x[i]}
