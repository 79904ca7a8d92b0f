"""Processes that race on one job store, for tests/test_store.py.

Spawned (each with its own engine and connections, as separate schedulers have); this module
imports only the store, so that starting many of them stays cheap.
"""

from __future__ import annotations

import multiprocessing
import queue
import time

import sqlalchemy as sa

from orchestrator.store import IllegalTransition, JobStore, normalize_url

RACERS = 8
CHAIN = (("queued", "admitted"), ("admitted", "running"), ("running", "succeeded"))


def race(target, *args) -> list:
    """Run ``target(barrier, me, results, *args)`` in RACERS spawned processes released together
    by ``barrier``; return what each put on ``results``, in racer order."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, me, results, *args)) for me in range(RACERS)]
    for p in procs:
        p.start()
    out: dict = {}
    deadline = time.monotonic() + 180
    try:
        while len(out) < RACERS and time.monotonic() < deadline:
            try:
                me, got = results.get(timeout=1)
                out[me] = got
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break  # a racer died before reporting
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return [out.get(me, f"racer {me}: no report (exit code {procs[me].exitcode})") for me in range(RACERS)]


def move_every_job(barrier, me, results, url, job_ids):
    """Try every step of every job's chain; report the steps this process won."""
    try:
        store = JobStore(url)
        barrier.wait(120)
        won = []
        for jid in job_ids:
            for frm, to in CHAIN:
                try:
                    store.transition(jid, to, f"racer {me}", expect=frm, ray_submission_id=f"racer-{me}")
                    won.append((jid, to))
                except IllegalTransition:
                    pass  # another racer moved it first
        results.put((me, won))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        results.put((me, f"racer {me}: {type(e).__name__}: {e}"))


def open_store(barrier, me, results, url):
    """Open the store at ``url`` (creating its schema if absent) at the same moment as the others."""
    try:
        sa.create_engine(normalize_url(url)).dispose()  # import the driver first: start level
        barrier.wait(120)
        store = JobStore(url)
        store.list()
        store.close()
        results.put((me, "ok"))
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        results.put((me, f"racer {me}: {type(e).__name__}: {e}"))
