"""Canary benchmark: what a canary does to stable's traffic, stage by stage, in one run.

``python -m bench.serve.canary [--rate 40] [--duration 8] [--out report.json]``

Deploys this project's deployment (``jobs.serve.deploy``) of a small mlp twice on a fresh local
Ray: ``base`` (stable only, all along) and ``rollout`` (stable plus the canary under test). One
open-loop load (``--rate`` requests/s to each, interleaved, on a fixed schedule whatever the
replies do: as independent users would) hits both at once, so the machine's noise hits both
alike, and per reply's ``model_version`` gives stable's p50/p95 latency (from each request's
scheduled send) and the requests/s it answered within the measured window, for:

* ``none``: no canary on ``rollout`` either;
* ``good@P``: a canary with stable's very weights at each stage P of ``--steps``;
* ``slow@P``: the same weights, ``--slow-ms`` slower per forward (``tests.fake_models:slow_mlp``).

``ratios`` gives, per run, stable's p95 on ``rollout`` over ``base``'s, and stable's answered
requests/s over ``(1 - P/100)`` times ``base``'s (1.0: stable answers its whole share). Each
stage is set the way ``jobs.serve.rollout`` sets its first one (the same ``user_config``: share,
mirror share), without the gates, so every stage is measured for the same time. Prints a JSON
report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _open_loop(urls: list[str], body: bytes, rate: float, warmup: float,
                     duration: float) -> dict[str, list[tuple]]:
    """Per URL, ``(model_version or None, latency_s, answered_at)`` per request sent after the
    warm-up; ``rate`` requests/s to each URL, interleaved."""
    import aiohttp
    out: dict[str, list[tuple]] = {u: [] for u in urls}
    step = 1.0 / (rate * len(urls))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        t_measure = t0 + warmup

        async def one(url: str, due: float):
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    reply = await r.json(content_type=None)
                    version = reply.get("model_version") if r.status == 200 else None
            except aiohttp.ClientError:
                version = None
            now = loop.time()
            if due >= t_measure:
                out[url].append((version, now - due, now - t_measure))

        tasks = []
        for k in range(int((warmup + duration) * rate * len(urls))):
            due = t0 + k * step
            await asyncio.sleep(max(0.0, due - loop.time()))  # the schedule, not a wait for replies
            tasks.append(loop.create_task(one(urls[k % len(urls)], due)))
        await asyncio.gather(*tasks)
    return out


def _arm(rows: list[tuple], version: str, duration: float) -> dict:
    lat = np.asarray([lat for v, lat, _ in rows if v == version]) * 1e3
    done = sum(1 for v, _, at in rows if v == version and at <= duration)
    if not len(lat):
        return {"requests": 0}
    return {"requests": int(len(lat)), "answered_per_s": round(done / duration, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve.canary", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=40.0, help="offered requests/s to each application")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per stage")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--steps", default="1,5,10,25,50", help="canary percents measured (100 is the promotion)")
    p.add_argument("--slow-ms", type=float, default=100.0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out", help="write the JSON report here too")
    args = p.parse_args(argv)

    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    import ray
    from ray import serve

    from actors.served_model import save_served_model
    from actors.serve.deployment import user_config
    from jobs.examples.models import mlp
    from jobs.serve import _apply, _checked, deploy
    from orchestrator.spec import ModelRef, parse_spec
    from tests.fake_models import slow_mlp

    kwargs = {"in_dim": 32, "hidden": args.hidden, "num_classes": 4}
    torch.manual_seed(0)
    model = mlp(**kwargs)
    root = tempfile.mkdtemp(prefix="bench-canary-")
    stable, good, slow = (os.path.join(root, n) for n in ("stable", "good", "slow"))
    save_served_model(model, stable, "jobs.examples.models:mlp", kwargs)
    save_served_model(model, good, "jobs.examples.models:mlp", kwargs)
    slow_kwargs = {"delay_s": args.slow_ms / 1e3, **kwargs}
    slow_model = slow_mlp(**slow_kwargs)
    slow_model.net.load_state_dict(model.state_dict())
    save_served_model(slow_model, slow, "tests.fake_models:slow_mlp", slow_kwargs)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec, base = (parse_spec({
        "kind": "serve", "name": f"bench-{name}", "checkpoint_url": stable,
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": kwargs}, "input_shape": [32],
        "http_port": port, "route_prefix": f"/{name}",
        "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": 0.5},
        "canary": {}}) for name in ("rollout", "base"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    body = json.dumps({"inputs": x.tolist()}).encode()
    q = spec.canary.quality
    report: dict = {"config": vars(args) | {"model": kwargs, "cpu_count": os.cpu_count(),
                                            "loadavg_at_start": os.getloadavg()}, "results": {}}
    try:
        url, base_url = deploy(spec), deploy(base)
        arms = {"good": (_checked(spec, good, spec.model), good),
                "slow": (_checked(spec, slow, ModelRef(factory="tests.fake_models:slow_mlp", kwargs=slow_kwargs)),
                         slow)}
        runs = [("none", None, 0.0)] + [(f"{kind}@{pct:g}", kind, pct) for kind in ("good", "slow")
                                         for pct in (float(s) for s in args.steps.split(","))]
        for name, kind, pct in runs:
            if kind is None:
                _apply(spec, user_config(spec, (stable, spec.model.model_dump(mode="json"))))
            else:
                _apply(spec, user_config(spec, (stable, spec.model.model_dump(mode="json")), arms[kind][0],
                                         pct / 100, f"bench-{name}", None, mirror_share=q.mirror_share))
            got = asyncio.run(_open_loop([url, base_url], body, args.rate, args.warmup, args.duration))
            rows = got[url]
            res = {"stable": _arm(rows, stable, args.duration), "base": _arm(got[base_url], stable, args.duration),
                   "failed": sum(v is None for rs in got.values() for v, _, _ in rs)}
            if kind is not None:
                res["canary"] = _arm(rows, arms[kind][1], args.duration)
            report["results"][name] = res
            report.setdefault("ratios", {})[name] = {
                "stable_p95_vs_base": round(res["stable"]["p95_ms"] / res["base"]["p95_ms"], 3),
                "stable_answered_vs_its_share_of_base": round(
                    res["stable"]["answered_per_s"] / ((1 - pct / 100) * res["base"]["answered_per_s"]), 3)}
            print(name, res, report["ratios"][name], file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["config"]["loadavg_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
