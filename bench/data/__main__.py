"""``python -m bench.data --samples 500000``: one synthetic dataset, every loader, one table.

Writes the dataset in each format under ``--workdir`` (reused when the size matches), starts a
loopback S3 endpoint (moto_server) for the S3 rows, warms the page cache, then runs each contender
in its own process and prints samples/s, time to first batch, peak memory and shuffle scores.
Peers run under ``--peer-python`` (a venv holding mosaicml-streaming / litdata) and are skipped
when they do not import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = ["ours-global-local", "ours-global-objstore-local", "ours-global-objstore-2node-local",
        "ours-global-stream-local", "ours-global-stream-2node-local", "ours-global-s3", "ours-local-local"]
RAW = ["raw-local", "raw-s3"]
REF = ["take1-local", "take2-local"]  # numpy.take of a random permutation from anonymous memory
RAY = ["ray-data-global-local", "ray-data-local-local"]
PEERS = ["mosaic-local", "litdata-local"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_s3():
    import urllib.request
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
    return proc, url


def _peer_ok(python: str, module: str) -> bool:
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from bench.data.contenders import _stub_torchvision; " \
           f"_stub_torchvision(); import {module}"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _warm(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def prepare(a, peer_python: str | None, peers: list[str]) -> None:
    from bench.data import prepare as prep
    w = a.workdir
    stamp = os.path.join(w, "dataset.json")
    want = {"samples": a.samples, "sample_bytes": a.sample_bytes, "rows_per_shard": a.rows_per_shard}
    have = json.load(open(stamp)) if os.path.exists(stamp) else {}
    if have.get("spec") != want:
        shutil.rmtree(w, ignore_errors=True)
        os.makedirs(w)
        have = {"spec": want, "formats": []}
    t = time.perf_counter()

    def need(fmt):
        return fmt not in have["formats"]

    def done(fmt):
        have["formats"].append(fmt)
        json.dump(have, open(stamp, "w"))
        print(f"  {fmt}: ready ({time.perf_counter() - t:.0f}s)", flush=True)

    if need("ours"):
        prep.write_ours(os.path.join(w, "ours"), a.samples, a.sample_bytes, a.rows_per_shard)
        done("ours")
    if any(o.startswith("ray-data") for o in a.only) and need("parquet"):
        prep.write_parquet(os.path.join(w, "parquet"), a.samples, a.sample_bytes, a.rows_per_shard)
        done("parquet")
    for fmt, contender in (("mds", "mosaic-local"), ("litdata", "litdata-local")):
        if contender in peers and need(fmt):
            fn = "write_mds" if fmt == "mds" else "write_litdata"
            code = (f"import sys; sys.path.insert(0, {ROOT!r}); from bench.data.contenders import "
                    f"_stub_torchvision; _stub_torchvision(); from bench.data import prepare as p; "
                    f"p.{fn}({os.path.join(w, fmt)!r}, {a.samples}, {a.sample_bytes})")
            subprocess.run([peer_python, "-c", code], check=True, cwd=ROOT)
            done(fmt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=500_000)
    p.add_argument("--sample-bytes", type=int, default=4096)
    p.add_argument("--rows-per-shard", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--workdir", default="/tmp/reo-bench-data")
    p.add_argument("--peer-python", default=os.environ.get("BENCH_PEER_PYTHON", sys.executable),
                   help="python of a venv with mosaicml-streaming / litdata (pip install '.[bench]')")
    p.add_argument("--only", default="raw,ref,ours,ray-data,peers",
                   help="comma list of groups: raw, ref (numpy.take reference, 1 and 2 threads), ours, "
                        "ray-data, peers; or of contender names (e.g. raw-local,ours-global-objstore-local)")
    p.add_argument("--json-out", help="write all results here as JSON")
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs each contender reads: the first is timed with its start-up, the "
                        "later ones (steady state) on their own; order scores use the first")
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over every contender (in turn); each one's best pass is reported, "
                        "so a noisy moment on a shared machine does not decide a ratio")
    a = p.parse_args(argv)
    a.only = set(a.only.split(","))
    sys.path.insert(0, ROOT)

    peers = [c for c, mod in (("mosaic-local", "streaming"), ("litdata-local", "litdata"))
             if "peers" in a.only and _peer_ok(a.peer_python, mod)]
    if "peers" in a.only:
        for c in PEERS:
            if c not in peers:
                print(f"  {c}: skipped (does not import under {a.peer_python})")
    print(f"preparing {a.samples} x {a.sample_bytes} B samples in {a.workdir}", flush=True)
    prepare(a, a.peer_python, peers)
    s3proc, endpoint = _start_s3()
    try:
        contenders = (RAW if "raw" in a.only else []) + (REF if "ref" in a.only else []) + \
                     (OURS if "ours" in a.only else []) + \
                     (RAY if "ray-data" in a.only else []) + peers
        contenders += [c for c in RAW + REF + OURS + RAY if c in a.only and c not in contenders]
        if any(c.endswith("-s3") for c in contenders):
            from bench.data import prepare as prep
            t = time.perf_counter()
            prep.write_ours("s3://bench/ours", a.samples, a.sample_bytes, a.rows_per_shard)
            print(f"  ours on s3: ready ({time.perf_counter() - t:.0f}s)", flush=True)
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        for rep, c in [(rep, c) for rep in range(a.repeats) for c in contenders]:
            data_dir = {"ray": "parquet", "mosaic": "mds", "litdata": "litdata"}.get(c.split("-")[0], "ours")
            if c.endswith("-local"):
                _warm(os.path.join(a.workdir, data_dir))
            out = os.path.join(a.workdir, f"result-{c}.json")
            py = a.peer_python if c in PEERS else sys.executable
            cmd = [py, "-m", "bench.data.contenders", c, "--workdir", a.workdir, "--batch", str(a.batch),
                   "--rows-per-shard", str(a.rows_per_shard), "--s3-url", "s3://bench/ours",
                   "--endpoint-url", endpoint, "--epochs", str(a.epochs), "--out", out]
            print(f"running {c} (pass {rep + 1}/{a.repeats}) ...", flush=True)
            # RAY_ADDRESS=local: each contender starts its own Ray, never joining one another left
            env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="local")
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"  {c} failed:\n{r.stderr[-2000:]}")
                runs[c].append({"name": c, "error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"})
                continue
            runs[c].append(json.load(open(out)))
            r = runs[c][-1]
            later = r.get("later_epochs_samples_per_s")
            print(f"  epoch 1: {r['samples_per_s']:,.0f} samples/s after the first batch"
                  + (f"; epochs 2-{a.epochs}: {later:,.0f} samples/s" if later else ""), flush=True)
            shutil.rmtree(os.path.join(a.workdir, "cache"), ignore_errors=True)
        results = []
        for c in contenders:
            ok = [r for r in runs[c] if "error" not in r]
            best = dict(max(ok, key=_speed) if ok else runs[c][-1])
            best["passes_samples_per_s"] = [r.get("samples_per_s") for r in runs[c]]
            best["passes_later_epochs_samples_per_s"] = [r.get("later_epochs_samples_per_s") for r in runs[c]]
            results.append(best)
        print(table(results))
        print(pass_ratios(runs))
        if a.json_out:
            json.dump({"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(a).items()},
                       "results": results}, open(a.json_out, "w"), indent=1)
    finally:
        s3proc.terminate()
        s3proc.wait()
    return 0


def _speed(r: dict) -> float:
    """Steady-state samples/s (the epochs after the first) when measured, else the first epoch's."""
    return r.get("later_epochs_samples_per_s") or r["samples_per_s"]


def pass_ratios(runs: dict[str, list[dict]]) -> str:
    """Ours against raw and against the numpy.take reference, pass by pass (each pass runs every
    contender once, in turn, so a ratio compares runs minutes apart, not a best against a best)."""
    lines = []
    for c in [c for c in runs if c.startswith("ours-") and c.endswith("-local")]:
        for base in [b for b in ("raw-local", "take1-local", "take2-local") if b in runs]:
            rs = [(_speed(o) / _speed(b)) for o, b in zip(runs[c], runs[base]) if "error" not in o and "error" not in b]
            if rs:
                lines.append(f"{c} / {base}, same pass, steady state: "
                             + ", ".join(f"{r:.2f}x" for r in rs) + f" (median {statistics.median(rs):.2f}x)")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    raw = {r["name"].split("-")[-1]: r for r in ok if r["name"].startswith("raw")}
    lines = ["| loader | samples/epoch | samples/s, later epochs | vs raw | samples/s, epoch 1 after 1st batch | vs raw | "
             "epoch 1 samples/s (incl. 1st) | first batch s | peak PSS MB | Spearman rho | displacement | shards/batch (vs expected) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        base = raw.get(r["name"].split("-")[-1])
        later = r.get("later_epochs_samples_per_s")
        base_later = base.get("later_epochs_samples_per_s") if base else None
        q = (f"{r['spearman_rho']:+.4f} | {r['displacement']:.3f} | {r['shards_per_batch']:.1f} "
             f"({r['shards_per_batch_ratio']:.2f})") if "spearman_rho" in r else f"n/a | n/a | {r.get('quality_error', '')}"
        lines.append(
            f"| {r['name']} | {r['samples']} | {f'{later:,.0f}' if later else 'n/a'} | "
            f"{later / base_later if later and base_later else nan:.2f}x | {r['samples_per_s']:,.0f} | "
            f"{r['samples_per_s'] / base['samples_per_s'] if base else nan:.2f}x | {r['epoch_samples_per_s']:,.0f} | "
            f"{r['ttfb_s']:.2f} | {r['peak_pss_mb']:,.0f} | {q} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
