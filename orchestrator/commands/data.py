"""``orchestrator data write SOURCE URL`` and ``orchestrator data inspect URL``.

SOURCE is one of: a ``.npz`` file (each array a column), a Parquet file or directory URL, or a
``module:function`` factory returning a dict of numpy arrays or a map-style torch Dataset
(``--arg key=value`` passes keyword arguments, parsed as YAML scalars).
"""

from __future__ import annotations

import importlib
import json
import sys

import yaml

from orchestrator import storage


def register(sub) -> None:
    p = sub.add_parser("data", help="write and inspect sharded datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    w = dsub.add_parser("write", help="turn numpy arrays, Parquet or a torch Dataset into shards")
    w.add_argument("source", help="a .npz file, a Parquet file/dir URL, or module:function")
    w.add_argument("url", help="destination fsspec URL (path, file://, s3://...)")
    w.add_argument("--rows-per-shard", type=int, default=8192)
    w.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for a module:function source (repeatable)")
    w.add_argument("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL)")
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=run_write)

    i = dsub.add_parser("inspect", help="print a dataset's manifest summary")
    i.add_argument("url")
    i.add_argument("--verify", action="store_true", help="read every shard and check its sha256 (nothing is kept on disk)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL)")
    i.set_defaults(func=run_inspect)


def _options(args) -> dict:
    return {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}


def _kwargs(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"--arg {p!r}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def _load_source(source: str, args):
    if source.endswith(".npz"):
        import io

        import numpy as np
        with np.load(io.BytesIO(storage.read_bytes(source, _options(args)))) as z:
            return {k: z[k] for k in z.files}
    if ":" in source and not storage.has_scheme(source):  # module:function
        mod, fn = source.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"source {source!r}: cannot import ({e})") from None
        return factory(**_kwargs(args.arg))
    return source  # a Parquet URL


def run_write(args) -> int:
    from actors.data import ShardError, write_shards
    try:
        src = _load_source(args.source, args)
        m = write_shards(src, args.url, rows_per_shard=args.rows_per_shard,
                         storage_options=_options(args), progress=not args.no_progress)
    except (ValueError, ShardError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m.num_samples} samples in {m.num_shards} shards ({m.total_bytes / 2**20:.1f} MiB) to {args.url}")
    return 0


def run_inspect(args) -> int:
    from actors.data import ShardError, read_manifest
    from actors.data.store import verify_all
    try:
        m = verify_all(args.url, _options(args)) if args.verify else read_manifest(args.url, _options(args))
        verified = True if args.verify else None
    except (ValueError, ShardError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"url": args.url, "num_samples": m.num_samples, "num_shards": m.num_shards,
               "rows_per_shard": m.rows_per_shard, "bytes": m.total_bytes, "row_bytes": m.row_bytes,
               "schema": m.schema, "format": m.format, "verified": verified}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{args.url}: {m.num_samples} samples, {m.num_shards} shards of {m.rows_per_shard} rows, "
              f"{m.total_bytes / 2**20:.1f} MiB ({m.format} v{m.version})")
        for k, c in m.schema.items():
            print(f"  {k}: {c['dtype']}{c['shape']}")
        if verified:
            print("  all shard checksums verified")
    return 0
