"""Serve benchmark: one concurrent loopback load against four targets, in one run.

* ``deployment`` - this project's deployment (``jobs.serve.deploy``: validation, dynamic batching)
* ``plain``      - a plain unbatched Ray Serve deployment of the same checkpoint
* ``limit``      - the model's own batched forward in this process, no HTTP (the ceiling): the
  eager model and its TorchScript graph are both timed and the faster one is the limit
* ``serve_noop`` - a Ray Serve deployment with our replica settings that parses each request and
  answers without a model: what Serve's proxy and replica path alone carry under this load

``--ingress`` picks how requests reach a Serve target's replica:

* ``direct`` (default): Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) is on, and
  each Serve target is measured twice: through Serve's HTTP proxy (``deployment``) and straight to
  its replica's own HTTP port (``deployment_direct``), as a load balancer in front would reach it
* ``haproxy``: Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``): Serve's HTTP port is
  HAProxy, which forwards to the replica ports (``deployment_haproxy``)
* ``proxy``: Serve's HTTP proxy only (``deployment``)
* ``default``: what ``python -m jobs.serve`` gives a user by default: Ray started the way
  ``jobs.serve`` starts it for the spec's default ``ingress: auto`` (``deployment_default``; the
  report says which ingress that was: HAProxy where its binary runs, else direct ingress, which
  adds ``deployment_direct``)

The load is ``--concurrency`` closed-loop HTTP/1.1 keep-alive clients, each posting one request
(``--examples`` examples) and waiting for the reply, for ``--duration`` seconds per target after a
warm-up. Every target uses ``--threads`` torch threads. ``limit`` runs forwards of
``--max-batch-size`` examples back to back; its latency is one forward (a lower bound). For our
deployment the report adds, per path, the mean batch, the forward's milliseconds per example in
the replica and the share of the time its forward thread ran.
Prints a JSON report (and writes it to ``--out``); ``--plot`` draws requests/s and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)\r\n", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close\r\n", re.IGNORECASE)


class _HTTPClient(asyncio.Protocol):
    """One closed-loop HTTP/1.1 keep-alive client: posts, reads the whole reply, posts again.

    A minimal client on a raw asyncio protocol: the load generator shares the machine's cores with
    the server it measures, and aiohttp's client cost about 0.15 ms of CPU per request there.
    Replies may carry Content-Length or be chunked. After a reply with ``Connection: close`` the
    client reconnects, as HTTP clients do; a connection the server drops otherwise is an error.
    """

    def __init__(self, request: bytes, t_measure: float, t_end: float, stats: dict, done: asyncio.Future,
                 reconnect):
        self.request, self.t_measure, self.t_end, self.stats, self.done = request, t_measure, t_end, stats, done
        self.reconnect = reconnect  # called with ``done`` when the connection ends early
        self.buf = bytearray()
        self.t0 = 0.0
        self.closing = False  # the server said Connection: close
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self._send()

    def _send(self):
        self.t0 = time.perf_counter()
        if self.t0 >= self.t_end:
            self.transport.close()
            return
        self.transport.write(self.request)

    def data_received(self, data: bytes):
        self.buf += data
        head = self.buf.find(b"\r\n\r\n")
        end = None if head < 0 else self._reply_end(head)
        if end is None:
            return
        status = int(self.buf[9:12])
        self.closing = _CONNECTION_CLOSE.search(self.buf, 0, head + 2) is not None
        del self.buf[:end]
        t1 = time.perf_counter()
        if self.t0 >= self.t_measure:
            if status == 200:
                self.stats["lat"].append(t1 - self.t0)
            else:
                self.stats["err"] += 1
        if self.closing:
            self.transport.close()  # connection_lost reconnects
            return
        self._send()

    def _reply_end(self, head: int) -> int | None:
        """Where the reply whose headers end at ``head`` ends, or None while it is incomplete."""
        m = _CONTENT_LENGTH.search(self.buf, 0, head + 2)
        if m:
            end = head + 4 + int(m.group(1))
            return end if len(self.buf) >= end else None
        pos = head + 4  # chunked: size line, data, CRLF ... until the zero-size chunk
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(self.buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                return eol + 4 if len(self.buf) >= eol + 4 else None
            pos = eol + 2 + size + 2
            if len(self.buf) < pos:
                return None

    def connection_lost(self, exc):
        if time.perf_counter() < self.t_end:  # reconnect; unannounced, the request in flight failed
            if not self.closing:
                self.stats["err"] += 1
            self.reconnect(self.done)
        elif not self.done.done():
            self.done.set_result(None)


async def _http_load(url: str, body: bytes, concurrency: int, warmup: float, duration: float) -> tuple:
    from urllib.parse import urlsplit
    u = urlsplit(url)
    request = (f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    def connect(fut: asyncio.Future):
        return loop.create_connection(lambda: _HTTPClient(request, t_measure, t_end, stats, fut, reconnect),
                                      u.hostname, u.port)

    def reconnect(fut: asyncio.Future) -> None:
        loop.create_task(connect(fut))

    stats: dict = {"lat": [], "err": 0}
    done = [loop.create_future() for _ in range(concurrency)]
    for fut in done:
        await connect(fut)
    await asyncio.wait_for(asyncio.gather(*done), timeout=warmup + duration + 60)
    return stats["lat"], len(stats["lat"]), stats["err"]


def _run_load(*args) -> tuple:
    """:func:`_http_load` on uvloop when it is installed (it is with Ray Serve), else asyncio."""
    try:
        import uvloop
        return uvloop.run(_http_load(*args))
    except ImportError:
        return asyncio.run(_http_load(*args))


def _replica_info(app: str) -> dict:
    from ray import serve
    return serve.get_deployment_handle("model", app_name=app).info.remote().result()


def _batching(before: dict, after: dict, seconds: float) -> dict:
    """Batches our replica ran between two ``info()`` calls (warm-up and measured load together)."""
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    batches, examples = sum(sizes.values()), sum(k * v for k, v in sizes.items())
    forward_s = after["forward_s"] - before["forward_s"]
    return {"mean_batch_examples": round(examples / batches, 2) if batches else 0.0,
            "forward_ms_per_example": round(1e3 * forward_s / examples, 3) if examples else 0.0,
            "forward_thread_busy": round(forward_s / seconds, 3), "graph": after["graph"]["stable"]}


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
    out = _summary(lat, n, 0, time.perf_counter() - t_start, examples)
    out["forward_ms_per_example"] = round(1e3 * float(np.mean(lat)) / len(x), 3)
    return out


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
    p.add_argument("--graph-mode", default="auto", choices=["auto", "torchscript", "eager"],
                   help="our deployment's graph_mode (actors/serve/graph.py)")
    p.add_argument("--ingress", default="direct", choices=["direct", "haproxy", "proxy", "default"],
                   help="direct: Serve's proxy and the replica ports; haproxy: Serve's HAProxy "
                        "ingress; proxy: Serve's proxy only; default: what `python -m jobs.serve` "
                        "gives by default")
    p.add_argument("--only", default="limit,deployment,plain,serve_noop",
                   help="comma-separated targets to run (ratios need the targets they compare)")
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--plot", help="draw requests/s and latency per target to this PNG "
                                  "(default: beside --out, same name with .png)")
    args = p.parse_args(argv)

    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    import ray
    from ray import serve

    from actors.served_model import load_served_model, save_served_model
    from actors.serve.deployment import REPLICA_ENV, json_response
    from jobs.examples.models import mlp
    from jobs.serve import connect, deploy, replica_endpoints
    from orchestrator.spec import parse_spec

    kwargs = {"in_dim": args.in_dim, "hidden": args.hidden, "depth": args.depth, "num_classes": 16}
    torch.manual_seed(0)
    ckpt = tempfile.mkdtemp(prefix="bench-serve-")
    save_served_model(mlp(**kwargs), ckpt, "jobs.examples.models:mlp", kwargs)
    torch.set_num_threads(args.threads)
    x1 = np.random.default_rng(0).standard_normal((args.examples, args.in_dim)).astype(np.float32)
    body = json.dumps({"inputs": x1.tolist()}).encode()

    report: dict = {"config": vars(args) | {"model": kwargs, "cpu_count": os.cpu_count()}, "results": {}}
    only = {t.strip() for t in args.only.split(",") if t.strip()}
    unknown = only - {"limit", "deployment", "plain", "serve_noop"}
    if unknown:
        p.error(f"--only: unknown target(s) {sorted(unknown)}; choose from limit, deployment, plain, serve_noop")
    if "limit" in only:  # the eager model and its TorchScript graph: the faster one is the limit
        from actors.serve.graph import as_graph
        eager = load_served_model(ckpt)
        runs = {"eager": _limit(eager, x1, args.max_batch_size, args.warmup, args.duration, args.examples),
                "torchscript": _limit(as_graph(eager, (args.in_dim,), "float32", "torchscript")[0], x1,
                                      args.max_batch_size, args.warmup, args.duration, args.examples)}
        best = max(runs, key=lambda k: runs[k]["requests_per_s"])
        report["results"]["limit"] = runs[best] | {"graph": best, "requests_per_s_by_graph": {
            k: v["requests_per_s"] for k, v in runs.items()}}
        print("limit", report["results"]["limit"], file=sys.stderr, flush=True)

    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = parse_spec({
        "kind": "serve", "name": "bench-deployment", "checkpoint_url": ckpt,
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": kwargs},
        "input_shape": [args.in_dim], "http_port": port, "route_prefix": "/deployment",
        "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": args.threads},
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s},
        "graph_mode": args.graph_mode})
    if args.ingress in ("direct", "haproxy"):  # replicas answer HTTP themselves
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    if args.ingress == "haproxy":  # ... behind HAProxy on Serve's port instead of Serve's proxy
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    front = {"haproxy": "_haproxy", "default": "_default"}.get(args.ingress, "")
    if args.ingress == "default":  # Ray as jobs.serve starts it for this spec (ingress: auto)
        connect(spec)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    import orjson
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

    # Serve's replica settings as ours has them: the most a Serve deployment can carry here
    @serve.deployment(ray_actor_options={"num_cpus": args.threads, "runtime_env": {"env_vars": REPLICA_ENV}},
                      max_ongoing_requests=max(2 * args.max_batch_size, args.concurrency),
                      logging_config={"enable_access_log": False})
    class Noop:
        """Parses the request and answers without a model: what Serve itself can carry here."""

        async def __call__(self, request: Request):  # parsed and answered the way ours does
            n = len(orjson.loads(await request.body())["inputs"])
            return json_response({"outputs": np.zeros((n, 16), np.float32)})

    apps = {"deployment": spec.name, "plain": "bench-plain", "serve_noop": "bench-noop"}
    try:
        previous = None
        for name in ("deployment", "plain", "serve_noop"):
            if name not in only:
                continue
            if previous is not None:
                serve.delete(apps[previous])
            previous = name
            if name == "deployment":
                url = deploy(spec)
                report["ingress"] = {"ingress": url.ingress, "note": url.note}
                print("ingress:", url.note, file=sys.stderr, flush=True)
            elif name == "plain":
                serve.run(Plain.bind(ckpt, args.threads), name=apps[name], route_prefix="/plain")
                url = f"http://127.0.0.1:{port}/plain"
            else:
                serve.run(Noop.bind(), name=apps[name], route_prefix="/noop")
                url = f"http://127.0.0.1:{port}/noop"
            paths = [(name + front, url)] + [(f"{name}_direct", u) for u in replica_endpoints(apps[name])[:1]]
            for key, target in paths:  # through Serve's proxy, then straight to the replica
                before = _replica_info(spec.name) if name == "deployment" else None
                t0 = time.perf_counter()
                lat, ok, err = _run_load(target, body, args.concurrency, args.warmup, args.duration)
                report["results"][key] = _summary(lat, ok, err, args.duration, args.examples)
                if before is not None:  # how full the batches were, how busy the forward thread
                    report["results"][key].update(_batching(before, _replica_info(spec.name),
                                                            time.perf_counter() - t0))
                print(key, report["results"][key], file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rps = {k: v["requests_per_s"] for k, v in report["results"].items()}
    report["ratios"] = {}
    for path in ("", "_direct", "_haproxy", "_default"):  # each Serve path against the limit, ours against plain
        for a, b in (("deployment", "limit"), ("deployment", "plain"), ("deployment", "serve_noop"),
                     ("serve_noop", "limit")):
            a_key, b_key = a + path, b if b == "limit" else b + path
            if a_key in rps and b_key in rps:
                report["ratios"][f"{a_key}_vs_{b_key}"] = round(rps[a_key] / max(rps[b_key], 1e-9), 3)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    plot = args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out else None)
    if plot:
        _plot(report, plot)
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def _plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = report["results"]
    names = list(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    bars = a.barh(names, [r[n]["requests_per_s"] for n in names], color="tab:blue")
    a.bar_label(bars, fmt="%.0f", padding=3)
    a.invert_yaxis()
    a.set_xlabel("requests/s (higher is better)")
    a.set_title("throughput under the same load")
    y = np.arange(len(names))
    for i, (q, color) in enumerate((("p50_ms", "tab:green"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red"))):
        b.barh(y + (i - 1) * 0.27, [r[n][q] for n in names], height=0.27, color=color, label=q[:3])
    b.set_yticks(y, names)
    b.invert_yaxis()
    b.set_xscale("log")
    b.set_xlabel("latency, ms (log; lower is better)")
    b.legend()
    c = report["config"]
    fig.suptitle(f"bench.serve: mlp hidden {c['hidden']} depth {c['depth']}, {c['concurrency']} clients, "
                 f"{c['examples']} example/request, {c['threads']} thread/target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
