"""``python -m bench.data.transport_probe``: what moving a chunk of rows costs, without the loader.

The caps under the cross-node transports (docs/BENCHMARKS.md, Data loader): ``ray.put`` of one
chunk against a plain copy (with the page faults per put), an actor returning a ready chunk through
the object store on one node and across a two-node local cluster, and one TCP stream over
loopback into reused buffers (the ``stream`` transport's ceiling). No gather: only the hop.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import numpy as np

ROWS = 4096  # bytes per sample in the loader bench, to turn GB/s into samples/s


def _line(what: str, nbytes: int, seconds: float) -> str:
    return f"{what}: {nbytes / seconds / 2**30:.2f} GiB/s ({nbytes / ROWS / seconds / 1e3:,.0f}k samples/s of 4 KiB)"


def put_vs_copy(mb: int, n: int) -> None:
    import ray
    x = np.ones(mb << 20, np.uint8)
    for what, fn in (("np copy", x.copy), ("ray.put", lambda: ray.put(x))):
        fn()
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(n):
            fn()
        dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        print(_line(f"  {what} {mb} MiB", n * x.nbytes, dt) + f", {(r1.ru_minflt - r0.ru_minflt) / n:,.0f} page faults each")


def actor_hop(nodes: int, mb: int, n: int, depth: int) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, concurrency_groups={"batch": 2})
    class Chunks:
        def __init__(self):
            self.bufs = [np.full(mb << 20, i, np.uint8) for i in range(4)]
            self.i = 0

        @ray.method(concurrency_group="batch")
        def rows(self):
            self.i += 1
            return {"x": self.bufs[self.i % 4]}

    node, cluster = None, None
    if nodes == 1:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    else:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        node = cluster.add_node(num_cpus=1).node_id
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    try:
        opts = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)} if node else {}
        a = Chunks.options(**opts).remote()
        if nodes == 1:
            put_vs_copy(mb, n)
        inflight = [a.rows.remote() for _ in range(depth)]
        t = time.perf_counter()
        for _ in range(n):
            v = ray.get(inflight.pop(0))
            int(v["x"][::4096].sum())  # touch every page, as a consumer would
            del v
            inflight.append(a.rows.remote())
        print(_line(f"  actor -> object store -> consumer, {nodes} node(s), {depth} in flight", n * (mb << 20),
                    time.perf_counter() - t))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def tcp_loopback(mb: int, n: int, depth: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    if os.fork() == 0:
        conn, _ = srv.accept()
        bufs = [np.full(mb << 20, i, np.uint8) for i in range(4)]
        for i in range(n):
            conn.recv(8)
            conn.sendall(memoryview(bufs[i % 4]))
        os._exit(0)
    s = socket.create_connection(("127.0.0.1", port))
    pool = [np.empty(mb << 20, np.uint8) for _ in range(4)]
    for _ in range(depth):
        s.sendall(b"x" * 8)
    t = time.perf_counter()
    for i in range(n):
        mv, got = memoryview(pool[i % 4]), 0
        while got < len(mv):
            got += s.recv_into(mv[got:], len(mv) - got)
        int(pool[i % 4][::4096].sum())
        if i + depth < n:
            s.sendall(b"x" * 8)
    print(_line(f"  one TCP stream over loopback, {depth} in flight", n * (mb << 20), time.perf_counter() - t))
    os.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data.transport_probe", description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=16, help="chunk size (the loader bench's: 4 steps of 1,024 x 4 KiB)")
    p.add_argument("--chunks", type=int, default=100)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_ADDRESS", "local")  # our own Ray, never one already running
    print(f"load average {os.getloadavg()}")
    actor_hop(1, a.mb, a.chunks, 4)
    actor_hop(2, a.mb, a.chunks, 4)
    tcp_loopback(a.mb, a.chunks, 2)
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
