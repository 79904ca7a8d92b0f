"""Where capacity goes while jobs arrive: ``python -m bench.scheduler --probe``.

A :class:`~bench.scheduler.sim.Simulator` that, after every scheduling cycle before the last
arrival, samples (weighted by the time until the next cycle) what is allocated and what is free,
and whether jobs wait that could use it. Answers: is free capacity free because no waiting job
fits it, or because nobody asked for it?
"""

from __future__ import annotations

from bench.scheduler.sim import Simulator


class ProbeSimulator(Simulator):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.window_end = max(tj.arrival for tj in self.trace.jobs)
        self.gpu_cpus = sum(c for n, (c, g) in self.total.items() if g > 0)
        self._last = 0.0
        self._sample: dict[str, float] | None = None
        self.acc: dict[str, float] = {k: 0.0 for k in (
            "t", "cpu", "gpu", "gpu_free", "gpu_stranded", "cpu_workers_on_gpu_nodes",
            "t_gpu_waits", "gpu_free_while_gpu_waits", "gpu_free_fitting_a_waiting_gang",
            "t_cpu_waits", "gpu_growable_while_none_waits")}

    def cycle(self, t: float) -> bool:
        changed = super().cycle(t)
        if self._sample is not None:  # the state after the previous cycle held until now
            dt = min(t, self.window_end) - self._last
            if dt > 0:
                self.acc["t"] += dt
                for k, v in self._sample.items():
                    self.acc[k] += dt * v
        self._last = t
        self._sample = self._measure() if t < self.window_end else None
        return changed

    def _measure(self) -> dict[str, float]:
        usable = stranded = 0.0
        for n, (c, g) in self.free.items():
            if self.total[n][1] > 0:
                u = min(g, c // 8)  # the trace's GPU workers take 8 CPUs each
                usable += u
                stranded += g - u
        on_gpu = sum(w * j.view.cpus_per_worker for j in self.running.values() if j.view.gpus_per_worker == 0
                     for n, w in j.view.placement.items() if self.total[n][1] > 0)
        gpu_gangs = [j.view.min_allowed for j in self.queue.values() if j.view.gpus_per_worker > 0]
        cpu_waits = any(j.view.gpus_per_worker == 0 for j in self.queue.values())
        s = {"cpu": self.used_cpu / self.cap_cpu, "gpu": self.used_gpu / self.cap_gpu,
             "gpu_free": usable / self.cap_gpu, "gpu_stranded": stranded / self.cap_gpu,
             "cpu_workers_on_gpu_nodes": on_gpu / self.gpu_cpus if self.gpu_cpus else 0.0,
             "t_gpu_waits": float(bool(gpu_gangs)), "t_cpu_waits": float(cpu_waits)}
        if gpu_gangs:
            s["gpu_free_while_gpu_waits"] = usable / self.cap_gpu
            s["gpu_free_fitting_a_waiting_gang"] = usable / self.cap_gpu if min(gpu_gangs) <= usable else 0.0
        elif usable:
            room = sum(j.view.max_workers - j.view.workers for j in self.running.values()
                       if j.view.gpus_per_worker > 0 and not j.view.stopping)
            s["gpu_growable_while_none_waits"] = min(room, usable) / self.cap_gpu
        return s

    def report(self) -> dict[str, float]:
        """Time averages over the arrival window; the ``*_while_gpu_waits`` figure is averaged
        over the time a GPU job waits only."""
        T = self.acc["t"] or 1.0
        out = {k: v / T for k, v in self.acc.items() if k != "t"}
        tw = self.acc["t_gpu_waits"]
        out["gpu_free_while_gpu_waits"] = self.acc["gpu_free_while_gpu_waits"] / tw if tw else 0.0
        return out
