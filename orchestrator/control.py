"""Requests the scheduler sends a running train job, as small files under its checkpoint URL.

The scheduler and the job share nothing but storage (DESIGN invariant 2), so a request written
here reaches the job on any cluster, survives a scheduler restart and needs no Ray connection::

    <checkpoint url>/_control/
        checkpoint-request.json   {"id", "at"}: save a checkpoint at the next global step
        checkpoint-done.json      {"id", "step", "at"}: written by rank 0 once that save committed
        resize.json               {"max_workers", "checkpoint_first", "at"}: run on at most this
                                  many workers, once the named checkpoint request is served

The train loop polls the request (rank 0, every ``poll_s``) and answers it; the elastic scaling
policy (``actors.trainer.trainer``) honours ``resize.json``, so Ray Train itself restarts the
worker group on the new size from that fresh checkpoint. :func:`latest_commit` reads the newest
committed checkpoint's manifest without loading tensors (the scheduler's checkpoint age).

Nothing here imports torch or Ray.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.storage import Storage, StorageError

CONTROL_DIR = "_control"
REQUEST = f"{CONTROL_DIR}/checkpoint-request.json"
DONE = f"{CONTROL_DIR}/checkpoint-done.json"
RESIZE = f"{CONTROL_DIR}/resize.json"
# the checkpoint layout the scheduler reads (actors.trainer.checkpoint writes it)
STEP_RE = re.compile(r"^step-(\d{8,})$")
MANIFEST = "MANIFEST.json"


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Commit:
    """The newest committed checkpoint: its step, URL and commit time (epoch seconds)."""
    step: int
    url: str
    committed_at: float


class JobControl:
    """Read and write the control files of the train job checkpointing to ``checkpoint_url``."""

    def __init__(self, checkpoint_url: str, storage_options: dict[str, Any] | None = None,
                 *, clock=time.time):
        self.storage = Storage(checkpoint_url, storage_options)
        self.clock = clock

    def _read(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_text(rel))
        except (StorageError, ValueError, OSError):
            return None  # absent, or caught mid-write by a non-atomic store: ask again later

    # scheduler side --------------------------------------------------------------------------
    def request_checkpoint(self, request_id: str) -> None:
        """Ask the job to checkpoint at its next global step (idempotent per ``request_id``)."""
        cur = self._read(REQUEST)
        if cur and cur.get("id") == request_id:
            return
        self.storage.write_text(REQUEST, json.dumps({"id": request_id, "at": self.clock()}))

    def checkpoint_served(self, request_id: str) -> int | None:
        """The step saved for ``request_id``, or None while it has not been served."""
        done = self._read(DONE)
        return int(done["step"]) if done and done.get("id") == request_id else None

    def set_max_workers(self, max_workers: int, checkpoint_first: str | None = None) -> None:
        """Cap the job's worker count. With ``checkpoint_first`` the cap applies once that
        checkpoint request is served (so the resize restarts from a fresh checkpoint)."""
        self.storage.write_text(RESIZE, json.dumps({"max_workers": int(max_workers),
                                                    "checkpoint_first": checkpoint_first,
                                                    "at": self.clock()}))

    def clear(self) -> None:
        """Forget every request (a new attempt of the job starts uncapped by old ones)."""
        for rel in (REQUEST, DONE, RESIZE):
            if self.storage.exists(rel):
                self.storage.delete(rel)

    # job side --------------------------------------------------------------------------------
    def pending_request(self) -> str | None:
        """The id of a checkpoint request not yet served, if any."""
        req = self._read(REQUEST)
        if not req:
            return None
        done = self._read(DONE)
        return None if done and done.get("id") == req.get("id") else req.get("id")

    def mark_served(self, request_id: str, step: int) -> None:
        self.storage.write_text(DONE, json.dumps({"id": request_id, "step": int(step),
                                                  "at": self.clock()}))

    def max_workers(self, grace_s: float = 120.0) -> int | None:
        """The worker cap in force, or None. A cap waiting on a checkpoint that never comes
        applies anyway after ``grace_s`` (the job then resumes from its last periodic one)."""
        r = self._read(RESIZE)
        if not r:
            return None
        first = r.get("checkpoint_first")
        if first and self.checkpoint_served(first) is None and self.clock() - r.get("at", 0) < grace_s:
            return None
        return int(r["max_workers"])


def latest_commit(checkpoint_url: str, storage_options: dict[str, Any] | None = None) -> Commit | None:
    """The newest step directory with a manifest (not verified: that is the reader's job)."""
    st = Storage(checkpoint_url, storage_options)
    steps = sorted((int(m.group(1)), name) for name in st.list() if (m := STEP_RE.match(name)))
    for step, name in reversed(steps):
        try:
            man = json.loads(st.read_text(f"{name}/{MANIFEST}"))
        except (StorageError, ValueError):
            continue
        return Commit(step, st.url(name), float(man.get("committed_at", 0.0)))
    return None
