"""Serve benchmark: one concurrent loopback load against four targets, in one run.

* ``deployment`` - this project's deployment (``jobs.serve.deploy``: validation, dynamic batching)
* ``plain``      - a plain unbatched Ray Serve deployment of the same checkpoint
* ``limit``      - the model's own batched forward in this process, no HTTP (the ceiling)
* ``serve_noop`` - a Ray Serve deployment that parses each request and answers without a model:
  what Serve's proxy and replica path alone carry under this load (the ceiling of any deployment)

Serve runs with direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``; ``--proxy-only`` turns it
off), so each Serve target is measured twice: through Serve's HTTP proxy, and straight to its
replica's own HTTP port (``*_direct``), as a load balancer in front of the replicas would reach it.

The load is ``--concurrency`` closed-loop aiohttp clients, each posting one request
(``--examples`` examples) and waiting for the reply, for ``--duration`` seconds per target after a
warm-up. Every target uses ``--threads`` torch threads. ``limit`` runs forwards of
``--max-batch-size`` examples back to back; its latency is one forward (a lower bound).
Prints a JSON report (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _summary(latencies: list[float], n_ok: int, n_err: int, seconds: float, examples: int) -> dict:
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {"requests_per_s": round(n_ok / seconds, 1), "examples_per_s": round(n_ok * examples / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "ok": n_ok, "errors": n_err}


async def _http_load(url: str, body: bytes, concurrency: int, warmup: float, duration: float) -> tuple:
    import aiohttp
    lat: list[float] = []
    counts = {"ok": 0, "err": 0}
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def client(session):
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            t1 = time.perf_counter()
            if t0 >= t_measure:
                counts["ok" if ok else "err"] += 1
                if ok:
                    lat.append(t1 - t0)

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
    return lat, counts["ok"], counts["err"]


def _limit(model: torch.nn.Module, x1: np.ndarray, batch: int, warmup: float, duration: float, examples: int) -> dict:
    x = torch.from_numpy(np.repeat(x1, max(1, batch // len(x1)), axis=0)[:batch].copy())
    per_forward = len(x) // examples  # requests answered by one forward
    lat, n = [], 0
    with torch.inference_mode():
        t_end_warm = time.perf_counter() + warmup
        while time.perf_counter() < t_end_warm:
            model(x)
        t_start = time.perf_counter()
        while time.perf_counter() - t_start < duration:
            t0 = time.perf_counter()
            model(x)
            lat.append(time.perf_counter() - t0)
            n += per_forward
    return _summary(lat, n, 0, time.perf_counter() - t_start, examples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per target")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--examples", type=int, default=1, help="examples per request")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per replica")
    p.add_argument("--proxy-only", action="store_true",
                   help="run Serve without direct ingress (only the proxy path is measured)")
    p.add_argument("--out", help="write the JSON report here too")
    args = p.parse_args(argv)

    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    import ray
    from ray import serve

    from actors.serve.checkpoint import load_served_model, save_served_model
    from jobs.examples.models import mlp
    from jobs.serve import deploy, replica_endpoints
    from orchestrator.spec import parse_spec

    kwargs = {"in_dim": args.in_dim, "hidden": args.hidden, "depth": args.depth, "num_classes": 16}
    torch.manual_seed(0)
    ckpt = tempfile.mkdtemp(prefix="bench-serve-")
    save_served_model(mlp(**kwargs), ckpt, "jobs.examples.models:mlp", kwargs)
    torch.set_num_threads(args.threads)
    x1 = np.random.default_rng(0).standard_normal((args.examples, args.in_dim)).astype(np.float32)
    body = json.dumps({"inputs": x1.tolist()}).encode()

    report: dict = {"config": vars(args) | {"model": kwargs, "cpu_count": os.cpu_count()}, "results": {}}
    report["results"]["limit"] = _limit(load_served_model(ckpt), x1, args.max_batch_size,
                                        args.warmup, args.duration, args.examples)
    print("limit", report["results"]["limit"], file=sys.stderr, flush=True)

    if not args.proxy_only:  # replicas also answer HTTP themselves; the proxy stays up
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    from starlette.requests import Request

    # As many requests in flight as ours allows (Serve's default of 5 makes the router back off
    # and retry under this load, which measured 5 req/s: a configuration penalty, not batching's gain)
    @serve.deployment(ray_actor_options={"num_cpus": args.threads},
                      max_ongoing_requests=max(2 * args.max_batch_size, args.concurrency))
    class Plain:
        def __init__(self, url: str, threads: int):
            torch.set_num_threads(threads)
            self.model = load_served_model(url)

        async def __call__(self, request: Request):
            x = torch.tensor((await request.json())["inputs"], dtype=torch.float32)
            with torch.inference_mode():
                return {"outputs": self.model(x).tolist()}

    @serve.deployment(ray_actor_options={"num_cpus": args.threads},
                      max_ongoing_requests=max(2 * args.max_batch_size, args.concurrency))
    class Noop:
        """Parses the request and answers without a model: what Serve itself can carry here."""

        async def __call__(self, request: Request):
            return {"outputs": [[0.0] * 16 for _ in (await request.json())["inputs"]]}

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = parse_spec({
        "kind": "serve", "name": "bench-deployment", "checkpoint_url": ckpt,
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": kwargs},
        "input_shape": [args.in_dim], "http_port": port, "route_prefix": "/deployment",
        "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": args.threads},
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s}})
    try:
        url = deploy(spec)
        for name, app in (("deployment", spec.name), ("plain", "bench-plain"), ("serve_noop", "bench-noop")):
            if name == "plain":
                serve.delete(spec.name)
                serve.run(Plain.bind(ckpt, args.threads), name=app, route_prefix="/plain")
                url = f"http://127.0.0.1:{port}/plain"
            elif name == "serve_noop":
                serve.delete("bench-plain")
                serve.run(Noop.bind(), name=app, route_prefix="/noop")
                url = f"http://127.0.0.1:{port}/noop"
            paths = [(name, url)] + [(f"{name}_direct", u) for u in replica_endpoints(app)[:1]]
            for key, target in paths:  # through Serve's proxy, then straight to the replica
                lat, ok, err = asyncio.run(_http_load(target, body, args.concurrency, args.warmup, args.duration))
                report["results"][key] = _summary(lat, ok, err, args.duration, args.examples)
                print(key, report["results"][key], file=sys.stderr, flush=True)
            if name == "deployment":  # how full the batches were (warm-up and load together)
                sizes = serve.get_deployment_handle("model", app_name=spec.name).info.remote().result()["batch_sizes"]
                n = sum(sizes.values())
                report["results"][name]["mean_batch_examples"] = round(
                    sum(int(k) * v for k, v in sizes.items()) / n, 2) if n else 0.0
    finally:
        serve.shutdown()
        ray.shutdown()
    r = report["results"]
    rps = {k: v["requests_per_s"] for k, v in r.items()}
    report["ratios"] = {
        "deployment_vs_limit": round(rps["deployment"] / rps["limit"], 3),
        "deployment_vs_plain": round(rps["deployment"] / max(rps["plain"], 1e-9), 2),
        "deployment_vs_serve_noop": round(rps["deployment"] / rps["serve_noop"], 3),
        "serve_noop_vs_limit": round(rps["serve_noop"] / rps["limit"], 3)}
    if "deployment_direct" in rps:
        report["ratios"].update({
            "deployment_direct_vs_limit": round(rps["deployment_direct"] / rps["limit"], 3),
            "deployment_direct_vs_plain_direct": round(rps["deployment_direct"] / max(rps["plain_direct"], 1e-9), 2),
            "serve_noop_direct_vs_limit": round(rps["serve_noop_direct"] / rps["limit"], 3)})
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
