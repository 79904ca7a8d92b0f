"""``python -m bench.data.scale``: a dataset many times larger than each node's cache, on a loopback
S3 endpoint, read by simulated nodes with caches of their own; ours against MosaicML Streaming and
LitData on the same bytes.

One synthetic dataset (``--samples`` rows of ``--sample-bytes`` random bytes plus an int64 id) is
written in each format with the same shard size and uploaded to one moto_server. Each contender
then runs ``--nodes`` simulated nodes, one after another (each gets the machine to itself, as a
real node would), each reading rank r of ``--nodes`` for ``--epochs`` epochs through a cache
directory of its own limited to ``--cache-fraction`` of the dataset, talking to S3 through its own
byte-counting proxy (:mod:`bench.data.scale_node`):

* ``ours``: ``DataLoader`` with ``shuffle.mode: partitioned`` (``--partitions`` canonical
  partitions, blocks of ``--block-shards`` shards), ``cache_limit``, Belady eviction;
  ``ours-lru``: the same with LRU eviction (what knowing the order saves);
* ``streaming``: ``StreamingDataset(shuffle_algo="py1e", shuffle_block_size=block samples,
  num_canonical_nodes=partitions, cache_limit)`` + torch DataLoader (``--peer-workers``);
* ``litdata``: ``StreamingDataset(max_cache_size=..., shuffle=True)`` + ``StreamingDataLoader``.

Per node: bytes downloaded per epoch (on the wire), samples/s (epoch 1 after its first batch, and
epoch 2: steady state), first-batch latency, peak bytes in the cache directory. Per contender: the
shuffle scores of each whole epoch (the global order reassembled from every node's batches), and
for the orders alone, at several block sizes, ours against py1e, global and local. Prints tables
and ratios, writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTENDERS = ("raw", "ours", "ours-lru", "streaming", "litdata")
PEERS = {"streaming": "streaming", "litdata": "litdata"}
BUCKET = "scale"


def _peer_code(fn: str, *args) -> str:
    return (f"import sys; sys.path.insert(0, {ROOT!r}); from bench.data.contenders import _stub_torchvision; "
            f"_stub_torchvision(); from bench.data import scale; scale.{fn}(*{args!r})")


# ---------------------------------------------------------------------------------------------
# the dataset, once per format
# ---------------------------------------------------------------------------------------------
def write_mds(path: str, samples: int, sample_bytes: int, shard_bytes: int) -> None:
    from streaming import MDSWriter

    from bench.data.prepare import chunks
    with MDSWriter(out=path, columns={"id": "int64", "x": "bytes"}, size_limit=shard_bytes) as w:
        for lo, x in chunks(samples, sample_bytes):
            for i in range(len(x)):
                w.write({"id": lo + i, "x": x[i].tobytes()})


def write_litdata(path: str, samples: int, sample_bytes: int, shard_bytes: int) -> None:
    import litdata

    from bench.data.prepare import CHUNK, _LitChunk
    litdata.optimize(fn=_LitChunk(samples, sample_bytes), inputs=list(range(0, samples, CHUNK)),
                     output_dir=path, chunk_bytes=shard_bytes, num_workers=1, verbose=False)


def upload(local: str, prefix: str, endpoint: str) -> None:
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for dirpath, _, files in os.walk(local):
        for f in files:
            full = os.path.join(dirpath, f)
            s3.upload_file(full, BUCKET, f"{prefix}/{os.path.relpath(full, local)}")


def prepare(a, endpoint: str, contenders: list[str]) -> None:
    from bench.data import prepare as prep
    t = time.perf_counter()
    m = prep.write_ours(f"s3://{BUCKET}/ours", a.samples, a.sample_bytes, a.rows_per_shard)
    a.shard_bytes = m.shards[0].bytes
    a.dataset_bytes = m.total_bytes
    print(f"  ours: {m.num_shards} shards of {a.shard_bytes / 2**20:.2f} MiB, "
          f"{m.total_bytes / 2**20:,.0f} MiB ({time.perf_counter() - t:.0f}s)", flush=True)
    for c in contenders:
        if c not in PEERS:
            continue
        local = os.path.join(a.workdir, c)
        shutil.rmtree(local, ignore_errors=True)
        fn = "write_mds" if c == "streaming" else "write_litdata"
        subprocess.run([a.peer_python, "-c", _peer_code(fn, local, a.samples, a.sample_bytes, a.shard_bytes)],
                       check=True, cwd=ROOT)
        upload(local, c, endpoint)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local) for f in fs)
        print(f"  {c}: {size / 2**20:,.0f} MiB uploaded ({time.perf_counter() - t:.0f}s)", flush=True)


# ---------------------------------------------------------------------------------------------
# the orders alone (quality at several block sizes, no I/O)
# ---------------------------------------------------------------------------------------------
def py1e_order(samples: int, rows_per_shard: int, nodes: int, partitions: int, batch: int, block: int,
               seed: int, epoch: int, out: str) -> None:
    """Streaming's global order for an epoch: its partition of the sample space over nodes and
    batches, through its py1e shuffle (what its dataset does), saved as a .npy of ids."""
    from streaming.base.partition import get_partitions
    from streaming.base.shuffle import get_shuffle
    sizes = np.full(-(-samples // rows_per_shard), rows_per_shard, dtype=np.int64)
    sizes[-1] = samples - rows_per_shard * (len(sizes) - 1)
    ids = get_partitions("relaxed", samples, partitions, nodes, 1, 1, batch)
    shuffle = get_shuffle("py1e", sizes, partitions, seed, epoch, block)
    ids = np.where(ids != -1, shuffle[ids], -1)          # (nodes, 1, 1, batches, batch)
    steps = ids[:, 0, 0]                                   # (nodes, batches, batch)
    order = np.concatenate([steps[:, t].reshape(-1) for t in range(steps.shape[1])])
    np.save(out, order[order >= 0])


def order_quality(a) -> list[dict]:
    from actors.data import EpochOrder, score_order
    from actors.data.quality import reachable_shards_per_batch
    n, k, g = a.samples, a.rows_per_shard, a.batch * a.nodes
    rows = []

    def add(name, block, order_ids, reach):
        s = score_order(_rank_ids(order_ids), rows_per_shard=k, global_batch_size=g, reachable=reach)
        rows.append({"order": name, "block_shards": block, **s})

    add("global", None, EpochOrder(n, a.seed).full(0), None)
    for b in a.quality_blocks:
        o = EpochOrder(n, a.seed, "partitioned", b * k, k, a.partitions, g, False, 0.1)
        add("ours partitioned", b, o.full(0), reachable_shards_per_batch(o, g))
        add("ours local", b, EpochOrder(n, a.seed, "local", b * k, k).full(0), None)
        out = os.path.join(a.workdir, f"py1e-{b}.npy")
        r = subprocess.run([a.peer_python, "-c", _peer_code("py1e_order", n, k, a.nodes, a.partitions, a.batch,
                                                             b * k, a.seed, 0, out)], cwd=ROOT, capture_output=True)
        if r.returncode == 0:
            add("streaming py1e", b, np.load(out), reachable_shards_per_batch(o, g))
    return rows


def _rank_ids(ids: np.ndarray) -> np.ndarray:
    """An order over a dropped tail ranked onto 0..m-1 (scores need a permutation)."""
    ids = np.asarray(ids, dtype=np.int64)
    srt = np.sort(ids)
    return ids if np.array_equal(srt, np.arange(len(ids))) else np.searchsorted(srt, ids)


# ---------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------
def run_node(a, contender: str, rank: int, s3_port: int) -> dict:
    url = {"raw": f"s3://{BUCKET}/ours", "ours": f"s3://{BUCKET}/ours", "ours-lru": f"s3://{BUCKET}/ours",
           "streaming": f"s3://{BUCKET}/streaming", "litdata": f"s3://{BUCKET}/litdata"}[contender]
    cache = os.path.join(a.workdir, "caches", f"{contender}-node{rank}")
    shutil.rmtree(cache, ignore_errors=True)
    out = os.path.join(a.workdir, f"result-{contender}-{rank}.json")
    python = a.peer_python if contender in PEERS else sys.executable
    counter = out + ".bytes"
    proxy = subprocess.Popen([sys.executable, "-m", "bench.data.s3proxy", "--target", str(s3_port),
                              "--counter", counter], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    proxy_url = proxy.stdout.readline().strip()
    cmd = [python, "-m", "bench.data.scale_node", contender, "--url", url, "--proxy", proxy_url, "--counter", counter,
           "--rank", str(rank), "--world", str(a.nodes), "--batch", str(a.batch), "--cache", cache,
           "--limit", str(a.limit), "--partitions", str(a.partitions), "--block-shards", str(a.block_shards),
           "--rows-per-shard", str(a.rows_per_shard), "--epochs", str(a.epochs), "--seed", str(a.seed),
           "--workers", str(a.peer_workers), "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        proxy.kill()
        proxy.wait()
    print(r.stdout, end="", flush=True)
    if r.returncode != 0:
        print(f"  {contender} node {rank} failed:\n{r.stderr[-3000:]}", flush=True)
        return {"contender": contender, "rank": rank, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.load(open(out))
    res["ids"] = [np.load(f"{out}.epoch{e}.npy") for e in range(a.epochs)]
    shutil.rmtree(cache, ignore_errors=True)
    return res


def epoch_quality(a, nodes: list[dict], epoch: int) -> dict:
    """Scores of one epoch's global order: step t is every node's batch t, in rank order."""
    from actors.data import score_order
    per = [n["ids"][epoch] for n in nodes]
    steps = min(len(p) for p in per)
    order = np.concatenate([np.concatenate([p[t] for p in per]) for t in range(steps)])
    s = score_order(_rank_ids(order), rows_per_shard=a.rows_per_shard, global_batch_size=a.batch * a.nodes)
    s["unique_fraction"] = len(np.unique(order)) / max(1, len(order))
    s["samples"] = len(order)
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data.scale", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=131_072)
    p.add_argument("--sample-bytes", type=int, default=4096)
    p.add_argument("--rows-per-shard", type=int, default=128)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="per node (rank)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cache-fraction", type=float, default=0.1, help="each node's cache limit / dataset")
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--block-shards", type=int, default=4)
    p.add_argument("--quality-blocks", default="1,2,4,8,16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--peer-python", default=os.environ.get("BENCH_PEER_PYTHON", sys.executable))
    p.add_argument("--peer-workers", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/reo-bench-scale")
    p.add_argument("--out", default="bench_out/data_scale.json")
    a = p.parse_args(argv)
    a.quality_blocks = [int(b) for b in a.quality_blocks.split(",")]
    contenders = [c for c in a.only.split(",") if c]
    sys.path.insert(0, ROOT)
    from bench.data.__main__ import _peer_ok, _start_s3
    for c in list(contenders):
        if c in PEERS and not _peer_ok(a.peer_python, PEERS[c]):
            print(f"  {c}: skipped (does not import under {a.peer_python})")
            contenders.remove(c)
    os.makedirs(a.workdir, exist_ok=True)
    a.load_before = os.getloadavg()[0]
    print(f"load average (1 min) before the run: {a.load_before:.2f}", flush=True)
    s3proc, endpoint = _start_s3()
    try:
        import boto3
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        print(f"preparing {a.samples} x {a.sample_bytes} B samples on {endpoint}", flush=True)
        prepare(a, endpoint, contenders)
        a.limit = int(a.cache_fraction * a.dataset_bytes)
        print(f"cache limit per node {a.limit / 2**20:,.1f} MiB ({a.cache_fraction:.0%} of the dataset); "
              f"{a.nodes} nodes, {a.epochs} epochs, per-node batch {a.batch}", flush=True)
        port = int(endpoint.rsplit(":", 1)[1])
        runs: dict[str, list[dict]] = {}
        a.load_during = []
        for c in contenders:
            runs[c] = []
            for r in range(a.nodes):
                runs[c].append(run_node(a, c, r, port))
                a.load_during.append(os.getloadavg()[0])
        print(f"load average (1 min) after each node: {', '.join(f'{x:.2f}' for x in a.load_during)} "
              f"(2 cores; the endpoint and a node's processes make about 2)", flush=True)
        quality = {c: [epoch_quality(a, nodes, e) for e in range(a.epochs)]
                   for c, nodes in runs.items() if all("error" not in n for n in nodes)}
        orders = order_quality(a)
    finally:
        s3proc.terminate()
        s3proc.wait()
    report = summarize(a, runs, quality, orders)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for nodes in runs.values():
        for n in nodes:
            n.pop("ids", None)
    json.dump({"args": vars(a), "runs": runs, "quality": quality, "orders": orders, "summary": report},
              open(a.out, "w"), indent=1, default=float)
    plot(a, runs, a.out.rsplit(".", 1)[0] + ".png")
    return 0


def summarize(a, runs, quality, orders) -> dict:
    mib = 2**20
    print("\nper node (epoch 1 | epoch 2):")
    print("| loader | node | downloaded MiB (x share) | samples/s after 1st batch | first batch s | peak cache MiB (limit) |")
    print("|---|---|---|---|---|---|")
    share = a.dataset_bytes / a.nodes
    totals = {}
    for c, nodes in runs.items():
        for n in nodes:
            if "error" in n:
                print(f"| {c} | {n['rank']} | failed: {n['error'][:80]} | | | |")
                continue
            ep = n["epochs"]
            dl = " / ".join(f"{e['downloaded_bytes'] / mib:,.0f} ({e['downloaded_bytes'] / share:.2f})" for e in ep)
            sps = " / ".join(f"{e['samples_per_s_after_first']:,.0f}" for e in ep)
            print(f"| {c} | {n['rank']} | {dl} | {sps} | {ep[0]['ttfb_s']:.2f} | "
                  f"{n['peak_cache_bytes'] / mib:,.1f} ({a.limit / mib:,.1f}) |")
        ok = [n for n in nodes if "error" not in n]
        if ok:
            totals[c] = {
                "steady_samples_per_s": float(np.mean([n["epochs"][-1]["samples_per_s_after_first"] for n in ok])),
                "epoch1_samples_per_s": float(np.mean([n["epochs"][0]["samples_per_s_after_first"] for n in ok])),
                "downloaded_per_node_epoch_x_share": float(np.mean([e["downloaded_bytes"] / share for n in ok
                                                                    for e in n["epochs"]])),
                "max_downloaded_per_node_epoch_x_dataset": float(max(e["downloaded_bytes"] / a.dataset_bytes
                                                                     for n in ok for e in n["epochs"])),
                "first_batch_s": float(np.mean([n["epochs"][0]["ttfb_s"] for n in ok])),
                "peak_cache_over_limit": float(max(n["peak_cache_bytes"] for n in ok) / a.limit)}
    print("\nper contender (means over nodes):")
    print("| loader | steady samples/s | epoch-1 samples/s | downloaded per node-epoch (x share) | max per node-epoch (x dataset) | first batch s | peak cache / limit | rho (e1, e2) | displacement | shards/batch | unique |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c, t in totals.items():
        q = quality.get(c, [])
        rho = ", ".join(f"{x['spearman_rho']:+.4f}" for x in q)
        disp = ", ".join(f"{x['displacement']:.3f}" for x in q)
        spb = ", ".join(f"{x['shards_per_batch']:.1f}" for x in q)
        uniq = ", ".join(f"{x['unique_fraction']:.3f}" for x in q)
        print(f"| {c} | {t['steady_samples_per_s']:,.0f} | {t['epoch1_samples_per_s']:,.0f} | "
              f"{t['downloaded_per_node_epoch_x_share']:.2f} | {t['max_downloaded_per_node_epoch_x_dataset']:.3f} | "
              f"{t['first_batch_s']:.2f} | {t['peak_cache_over_limit']:.2f} | {rho} | {disp} | {spb} | {uniq} |")
    ratios = {}
    if "ours" in totals:
        for c in totals:
            if c != "ours":
                ratios[f"ours/{c} steady samples/s"] = totals["ours"]["steady_samples_per_s"] / totals[c]["steady_samples_per_s"]
                ratios[f"ours/{c} bytes"] = (totals["ours"]["downloaded_per_node_epoch_x_share"]
                                             / totals[c]["downloaded_per_node_epoch_x_share"])
    if ratios:
        print("\nratios: " + "; ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("\norders alone (epoch 1, whole epoch, no I/O):")
    print("| order | block shards | Spearman rho | displacement | shards/batch | vs reachable |")
    print("|---|---|---|---|---|---|")
    for r in orders:
        reach = f"{r['shards_per_batch_reachable_ratio']:.2f}" if "shards_per_batch_reachable_ratio" in r else "-"
        print(f"| {r['order']} | {r['block_shards'] or '-'} | {r['spearman_rho']:+.4f} | {r['displacement']:.3f} | "
              f"{r['shards_per_batch']:.1f} | {reach} |")
    return {"totals": totals, "ratios": ratios}


def plot(a, runs, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [c for c, nodes in runs.items() if all("error" not in n for n in nodes)]
    if not names:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    share = a.dataset_bytes / a.nodes
    w = 0.8 / len(names)
    for i, c in enumerate(names):
        nodes = runs[c]
        x = np.arange(a.nodes) + i * w
        axes[0].bar(x, [n["epochs"][-1]["samples_per_s_after_first"] for n in nodes], w, label=c)
        for e in range(a.epochs):
            axes[1].bar(x + (e - 0.5) * w / a.epochs, [n["epochs"][e]["downloaded_bytes"] / share for n in nodes],
                        w / a.epochs, color=f"C{i}", alpha=1.0 if e == 0 else 0.5)
        axes[2].bar(x, [n["peak_cache_bytes"] / a.limit for n in nodes], w, label=c)
    axes[0].set_title("steady samples/s per node (epoch 2)")
    axes[1].set_title("downloaded per epoch / node's share\n(solid: epoch 1, light: epoch 2)")
    axes[2].set_title("peak cache bytes / limit")
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("node")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
