"""Serving a checkpoint: real local Ray Serve, real HTTP on 127.0.0.1.

One Serve instance (and one application, ``serve-test``) is shared by the module; tests that roll
it read what it serves first, so they do not depend on each other's order. Ray Serve is shut down
at the end so later modules get the CPUs back.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from actors.serve.canary import ArmStats, QualityStats, gates, stage_decision
from actors.served_model import (ServedCheckpointError, load_served_model, read_served_meta,
                                     save_served_model)
from actors.serve.graph import GraphError, as_graph
from actors.serve.request import (InputSchema, RequestError, api_key_digest, check_api_key,
                                  check_content_type, parse_inputs)
from jobs.examples.models import mlp
from orchestrator.spec import Canary, ModelRef, parse_spec

try:  # Serve replicas import this module only for the fault-injecting factory below
    from conftest import _start_local_ray, free_port, wait_until
except ImportError:  # pragma: no cover
    pass

MLP = "jobs.examples.models:mlp"
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "examples")


class _Exploding(torch.nn.Module):
    """An mlp whose forward always raises: a canary that must be rolled back."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        raise RuntimeError("injected canary failure")


def exploding_mlp() -> torch.nn.Module:
    return _Exploding()


def _seeded_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp().eval()


def _forward(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).numpy()


# ---------------------------------------------------------------------------------------------
# pure units: request validation, API key, canary gate, checkpoint format
# ---------------------------------------------------------------------------------------------
SCHEMA = InputSchema((4,), "float32", max_request_examples=8)


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


def test_valid_inputs_parse_to_float32_array_of_the_declared_shape():
    x = parse_inputs(_body({"inputs": [[1, 2, 3, 4], [0.5, 0, -1, 2e3]]}), SCHEMA)
    assert x.dtype == np.float32 and x.shape == (2, 4)
    assert parse_inputs(_body({"inputs": [[1, 2], [3, 4]]}), InputSchema((2,), "int64")).dtype == np.int64


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (_body([[1, 2, 3, 4]]), 400, '{"inputs"'),
    (_body({"x": 1}), 400, '{"inputs"'),
    (_body({"inputs": []}), 400, "non-empty"),
    (_body({"inputs": [1, 2, 3, 4]}), 400, "shape [4]; expected [4, 4]"),
    (_body({"inputs": [[1, 2, 3]]}), 400, "expected [1, 4]"),
    (_body({"inputs": [[1, 2, 3, 4], [1, 2]]}), 400, "rectangular"),
    (_body({"inputs": [["a", "b", "c", "d"]]}), 400, "got strings"),
    (_body({"inputs": [[True, False, True, False]]}), 400, "got booleans"),
    (_body({"inputs": [[None, 1, 2, 3]]}), 400, "float32 numbers"),
    (b'{"inputs": [[NaN, 1, 2, 3]]}', 400, "non-finite"),
    (b'{"inputs": [[1e999, 1, 2, 3]]}', 400, "finite"),
    (_body({"inputs": [[1e39, 1, 2, 3]]}), 400, "overflow float32"),
    (_body({"inputs": [[1, 2, 3, 4]] * 9}), 413, "limit is 8"),
    (b" " * (SCHEMA.max_body_bytes + 1), 413, "bytes"),
])
def test_malformed_requests_are_refused_with_a_4xx_and_a_reason(body, status, words):
    with pytest.raises(RequestError) as e:
        parse_inputs(body, SCHEMA)
    assert e.value.status == status and words in e.value.message


def test_integers_beyond_64_bits_are_read_and_refused_with_a_reason():
    # orjson cannot read them; the standard parser does, and validation refuses them by name
    with pytest.raises(RequestError) as e:
        parse_inputs(b'{"inputs": [[18446744073709551616, 1]]}', InputSchema((2,), "int64"))
    assert e.value.status == 400 and "int64" in e.value.message


class _BatchBaked(torch.nn.Module):
    """Traces into a graph with the traced batch size (2) baked in as a constant."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * int(x.shape[0])


def test_graph_mode_auto_serves_a_traceable_model_as_torchscript_with_the_same_outputs():
    model = _seeded_mlp(1)
    graph, how = as_graph(model, (32,), "float32")
    assert how == "torchscript" and isinstance(graph, torch.jit.ScriptModule)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(_forward(graph, x), _forward(model, x), rtol=1e-5, atol=1e-6)
    assert as_graph(model, (32,), "float32", "eager") == (model, "eager")


@pytest.mark.parametrize("model, why", [(_BatchBaked(), "differ"), (_Exploding(), "injected")])
def test_graph_mode_auto_falls_back_to_eager_and_torchscript_refuses(model, why):
    model.eval()
    shape = (4,) if isinstance(model, _BatchBaked) else (32,)
    assert as_graph(model, shape, "float32") == (model, "eager")
    with pytest.raises(GraphError, match=f"graph_mode torchscript: m1 cannot run .*{why}"):
        as_graph(model, shape, "float32", "torchscript", what="m1")


def test_int64_inputs_refuse_floats():
    with pytest.raises(RequestError, match="int64 numbers; got floats"):
        parse_inputs(_body({"inputs": [[1.5, 2]]}), InputSchema((2,), "int64"))


def test_api_key_accepts_bearer_or_x_api_key_and_refuses_the_rest():
    digest = api_key_digest("s3cret")
    check_api_key({"authorization": "Bearer s3cret"}, digest)
    check_api_key({"x-api-key": "s3cret"}, digest)
    check_api_key({}, None)  # no key configured: open
    for headers in ({}, {"authorization": "Bearer nope"}, {"x-api-key": "nope"}, {"authorization": "s3cret"}):
        with pytest.raises(RequestError) as e:
            check_api_key(headers, digest)
        assert e.value.status == 401


@pytest.mark.parametrize("content_type", [None, "", "application/json", "Application/JSON; charset=utf-8",
                                          "application/vnd.api+json"])
def test_json_content_types_and_none_are_accepted(content_type):
    check_content_type({} if content_type is None else {"content-type": content_type})


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonl"])
def test_other_content_types_are_refused_with_415_saying_what_to_send(content_type):
    with pytest.raises(RequestError) as e:
        check_content_type({"content-type": content_type})
    assert e.value.status == 415 and "application/json" in e.value.message and content_type in e.value.message


def _arm(n, errors=0, latency=0.010):
    return ArmStats.from_samples([latency] * n, errors)


def _decide(stable, canary, stats=None, held_s=float("inf"), **cfg):
    """The stage verdict with the traffic gates alone (no quality gate) unless cfg says otherwise."""
    cfg.setdefault("quality", None)
    return stage_decision(stable, canary, Canary(**cfg), stats, held_s)


def test_canary_gate_waits_for_min_requests_on_both_arms():
    assert _decide(_arm(49), _arm(500), min_requests=50) == "wait"
    assert _decide(_arm(500), _arm(49), min_requests=50) == "wait"
    assert _decide(_arm(50), _arm(50), min_requests=50) == "promote"


def test_canary_gate_rolls_back_on_relative_error_increase_over_5_percent_with_a_floor_for_small_counts():
    assert _decide(_arm(1000, 100), _arm(1000, 104), min_requests=10, error_allowance=0) == "promote"   # +4%
    assert _decide(_arm(1000, 100), _arm(1000, 106), min_requests=10, error_allowance=0) == "rollback"  # +6%
    assert _decide(_arm(1000, 0), _arm(1000, 1), min_requests=10, error_allowance=0) == "rollback"
    assert _decide(_arm(1000, 50), _arm(1000, 0), min_requests=10) == "promote"
    # the default error_allowance (1): 1 error in 50 against none is not fatal, 2 are
    assert _decide(_arm(50, 0), _arm(50, 1), min_requests=10) == "promote"
    assert _decide(_arm(50, 0), _arm(50, 2), min_requests=10) == "rollback"
    assert _decide(_arm(1000, 100), _arm(1000, 106), min_requests=10) == "promote"      # 105 + 1 allowed
    assert _decide(_arm(1000, 100), _arm(1000, 107), min_requests=10) == "rollback"


def test_canary_gate_rolls_back_when_p95_is_over_20_percent_slower():
    assert _decide(_arm(100, latency=0.100), _arm(100, latency=0.119), min_requests=10) == "promote"
    assert _decide(_arm(100, latency=0.100), _arm(100, latency=0.121), min_requests=10) == "rollback"
    slow_tail = ArmStats.from_samples([0.01] * 90 + [0.5] * 10, 0)  # p95 in the tail
    assert _decide(_arm(100), slow_tail, min_requests=10) == "rollback"
    assert _decide(_arm(100, latency=0.1), _arm(100, latency=0.12), min_requests=10,
                   max_p95_slowdown=0.5) == "promote"


def test_canary_gates_give_each_verdict_with_its_figures():
    cfg = Canary(min_requests=10, error_allowance=0)
    g = {x.name: x for x in gates(_arm(100, 0, 0.100), _arm(100, 2, 0.115), cfg)}
    assert (g["error_rate"].passed, g["error_rate"].canary, g["error_rate"].limit) == (False, 0.02, 0.0)
    p95 = g["p95_latency_ms"]
    assert p95.passed and p95.canary == pytest.approx(115) and p95.limit == pytest.approx(120)
    assert p95.line() == "p95_latency_ms: canary 115 vs stable 100, limit 120 -> pass"
    q = gates(_arm(100), _arm(100), cfg, QualityStats(200, 150.0, 0.0, "classification"))[-1]
    assert (q.name, q.passed, q.canary, q.limit) == ("quality_agreement", False, 0.75, 0.9)
    assert q.line() == "quality_agreement: canary 0.75 vs stable 1, least 0.9 -> fail"


def test_a_stage_passes_only_after_min_stage_s_but_rolls_back_as_soon_as_a_gate_fails():
    cfg = dict(min_requests=10, min_stage_s=5)
    assert _decide(_arm(100), _arm(100), held_s=4.9, **cfg) == "wait"
    assert _decide(_arm(100), _arm(100), held_s=5.0, **cfg) == "promote"
    assert _decide(_arm(100), _arm(100, 50), held_s=0.5, **cfg) == "rollback"


def test_quality_gate_compares_agreement_for_classifiers_and_relative_error_for_regressors():
    from actors.serve.quality import compare, resolve_task
    logits = np.array([[3.0, 1, 0], [0, 2, 1], [1, 0, 5], [0, 9, 1]])
    assert resolve_task("auto", logits) == "classification"
    assert resolve_task("auto", np.zeros((4, 1))) == resolve_task("auto", np.zeros(4)) == "regression"
    flipped = logits.copy()
    flipped[0] = [0, 3, 1]                                   # one of four argmaxes differs
    assert compare(logits, flipped, "classification") == (4, 3.0, 0.0)
    seq = np.zeros((2, 5, 3))
    seq[..., 0] = 1
    other = seq.copy()
    other[0, :2] = [0, 1, 0]                                 # 2 of 5 positions differ in example 0
    assert compare(seq, other, "classification") == (2, pytest.approx(1.6), 0.0)
    y = np.array([[1.0], [2.0], [-4.0]])
    n, _, rel = compare(y, y * 1.1, "regression")
    assert n == 3 and rel / n == pytest.approx(0.1)
    cfg = dict(min_requests=10, quality={"min_examples": 100, "min_agreement": 0.9, "max_relative_error": 0.05})
    good, bad = QualityStats(100, 95.0, 0.0, "classification"), QualityStats(100, 80.0, 0.0, "classification")
    assert _decide(_arm(50), _arm(50), good, **cfg) == "promote"
    assert _decide(_arm(50), _arm(50), bad, **cfg) == "rollback"
    assert _decide(_arm(50), _arm(50), QualityStats(99, 99.0, 0.0), **cfg) == "wait"  # too few mirrored
    assert _decide(_arm(50), _arm(50), QualityStats(100, 0.0, 4.0, "regression"), **cfg) == "promote"
    assert _decide(_arm(50), _arm(50), QualityStats(100, 0.0, 6.0, "regression"), **cfg) == "rollback"


def test_eval_set_accuracy_may_drop_at_most_max_accuracy_drop(tmp_path):
    from actors.serve.canary import eval_gate
    from actors.serve.quality import accuracy, load_eval_set
    model = _seeded_mlp(1)
    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    y = _forward(model, x).argmax(-1)
    url = str(tmp_path / "eval.npz")
    np.savez(url, x=x, y=y)
    x2, y2 = load_eval_set(url)
    assert accuracy(model, x2, y2) == 1.0 and accuracy(_seeded_mlp(2), x2, y2) < 0.7
    cfg = Canary(quality={"max_accuracy_drop": 0.02})
    assert eval_gate(0.90, 0.885, cfg).passed and not eval_gate(0.90, 0.87, cfg).passed
    np.savez(str(tmp_path / "bad.npz"), x=x)
    with pytest.raises(ValueError, match=r"no array \['y'\]"):
        load_eval_set(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="quality.eval_set .*cannot read it"):
        load_eval_set(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="quality.eval_set: the model gives one value per example"):
        accuracy(torch.nn.Linear(32, 1), x2, y2)


@pytest.mark.parametrize("canary, field, words", [
    ({"steps": [5, 1, 100]}, "canary.steps", "strictly increasing"),
    ({"steps": [10, 50]}, "canary.steps", "last step must be 100"),
    ({"steps": [0, 100]}, "canary.steps", "(0, 100]"),
    ({"steps": [10, 120]}, "canary.steps", "(0, 100]"),
    ({"share": 0.2, "steps": [1, 100]}, "canary.share", "not both"),
    ({"min_stage_s": -1}, "canary.min_stage_s", "greater than or equal"),
    ({"quality": {"mirror_share": 0}}, "canary.quality.mirror_share", "greater than"),
    ({"quality": {"task": "regression", "eval_set": "/tmp/e.npz"}}, "canary.quality.eval_set", "accuracy"),
])
def test_canary_spec_refuses_bad_steps_naming_the_field(canary, field, words):
    from orchestrator.spec import SpecError
    with pytest.raises(SpecError) as e:
        _spec(8000, canary=canary)
    assert any(path == field and words in reason for path, reason in e.value.errors), e.value.errors


def test_canary_spec_defaults_to_six_stages_and_an_older_share_means_share_then_100():
    assert _spec(8000, canary={}).canary.steps == [1, 5, 10, 25, 50, 100]
    assert _spec(8000, canary={"share": 0.3}).canary.steps == [30, 100]
    assert _spec(8000, canary={}).canary.quality.mirror_share == 0.1
    assert _spec(8000, canary={"quality": None}).canary.quality is None


def test_served_checkpoint_round_trips_on_any_storage_url(tmp_path):
    model = _seeded_mlp(7)
    for url in (str(tmp_path / "ckpt"), f"memory://serve-test/{time.monotonic_ns()}"):
        save_served_model(model, url, MLP, {}, step=12, metrics={"loss": 0.5})
        assert read_served_meta(url) == {"factory": MLP, "kwargs": {}, "step": 12, "metrics": {"loss": 0.5}}
        x = torch.randn(3, 32)
        for ref in (None, ModelRef(factory=MLP)):
            np.testing.assert_array_equal(_forward(load_served_model(url, ref), x), _forward(model, x))


def test_checkpoint_that_does_not_fit_the_model_is_refused_with_its_url(tmp_path):
    url = str(tmp_path / "ckpt")
    save_served_model(_seeded_mlp(1), url, MLP, {})
    with pytest.raises(ServedCheckpointError, match="do not fit"):
        load_served_model(url, ModelRef(factory=MLP, kwargs={"hidden": 8}))
    with pytest.raises(ServedCheckpointError, match="not a served checkpoint"):
        load_served_model(str(tmp_path / "missing"))


def _training_checkpoint(root: str, model: torch.nn.Module, step: int = 7) -> str:
    """Commit ``model``'s weights at ``step`` under ``root`` in the trainer's checkpoint format
    (one rank, whole tensors), with the example train spec it came from; returns the step's URL."""
    from actors.trainer.checkpoint import CheckpointStore, SaveRequest
    from orchestrator.spec import load_spec
    spec = load_spec(os.path.join(EXAMPLES, "mlp_train.yaml")).model_dump(mode="json")
    store = CheckpointStore(root)
    tensors = {n: {"fp32": t.detach().clone()} for n, t in model.state_dict().items()}
    store.write_shard(SaveRequest(step, 0, 1, tensors, {"seed": 0}, {"step": step, "spec": spec}))
    return store.commit(step, 1, {"loss": 0.5}, timeout_s=10)


def test_a_training_checkpoint_given_to_the_loader_is_refused_naming_the_command_that_exports_it(tmp_path):
    step = _training_checkpoint(str(tmp_path / "ckpt"), _seeded_mlp(4))
    for url in (step, str(tmp_path / "ckpt")):
        with pytest.raises(ServedCheckpointError) as e:
            load_served_model(url)
        assert (f"It is a training checkpoint: `python -m jobs.serve SPEC --checkpoint {url}`" in str(e.value)
                and f"`orchestrator export {step} {tmp_path / 'ckpt' / 'served' / 'step-00000007'}`"
                in str(e.value)), str(e.value)


def test_jobs_serve_exports_a_training_checkpoint_next_to_it_once_without_ray(tmp_path, no_ray):
    from jobs.serve import servable_checkpoint
    model = _seeded_mlp(5)
    root = str(tmp_path / "ckpt")
    step = _training_checkpoint(root, model)
    spec = _spec(8000)
    url, note = servable_checkpoint(spec, root)
    assert url == str(tmp_path / "ckpt" / "served" / "step-00000007")
    assert note == f"exported training checkpoint {step} for serving to {url} (orchestrator export)"
    x = torch.randn(5, 32)
    np.testing.assert_array_equal(_forward(load_served_model(url, spec.model), x), _forward(model, x))
    assert read_served_meta(url)["step"] == 7
    assert servable_checkpoint(spec, step) == (url, f"training checkpoint {step} was exported before: serving {url}")
    assert servable_checkpoint(spec, url) == (url, None)  # a served checkpoint is itself
    with pytest.raises(ServedCheckpointError, match="not a served checkpoint"):
        servable_checkpoint(spec, str(tmp_path / "missing"))


_NO_RAY = """
import sys, ray
def refuse(*a, **k):
    print("RAY WAS STARTED", flush=True)
    sys.exit(99)
ray.init = refuse
from jobs.serve import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("checkpoint, words", [
    ("missing", "is not a served checkpoint: not found"),
    ("corrupt-training", "is a training checkpoint that could not be exported for serving (orchestrator export"),
])
def test_jobs_serve_refuses_a_bad_checkpoint_before_ray_starts(tmp_path, checkpoint, words):
    import subprocess
    import sys

    from conftest import ROOT
    url = str(tmp_path / checkpoint)
    if checkpoint == "corrupt-training":
        step = _training_checkpoint(url, _seeded_mlp(6))
        shard = os.path.join(step, "params-r00000.safetensors")
        open(shard, "r+b").write(b"garbage")  # the manifest's checksum no longer matches
    spec = tmp_path / "serve.yaml"
    spec.write_text(json.dumps(_spec(8000, checkpoint_url=url).model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _NO_RAY, str(spec)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(env, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "RAY WAS STARTED" not in r.stdout, (r.stdout, r.stderr)
    assert url in r.stderr and words in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60


def test_cli_refuses_a_spec_that_is_not_a_serve_spec(tmp_path, capsys):
    from jobs.serve import main
    path = tmp_path / "train.yaml"
    path.write_text("kind: tune\nname: x\n")
    assert main([str(path)]) == 2
    assert "error" in capsys.readouterr().err


def test_the_first_stop_signal_interrupts_jobs_serve_once_and_ray_init_does_not_take_it_over():
    """SIGTERM or SIGINT raises once (cleanup starts); a second signal during cleanup is ignored;
    the handlers survive ``ray.init`` (which sets SIGTERM to sys.exit) and are put back after."""
    import signal

    from jobs.serve import _keeping_sigterm_handler, _StopSignals, _Stopped
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with _StopSignals() as stop:
        mine = signal.getsignal(signal.SIGTERM)
        with _keeping_sigterm_handler():
            signal.signal(signal.SIGTERM, lambda *a: None)  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) == mine
        with pytest.raises(_Stopped) as e:
            signal.raise_signal(signal.SIGTERM)
        assert e.value.signum == stop.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)               # during cleanup: ignored
        signal.raise_signal(signal.SIGTERM)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ---------------------------------------------------------------------------------------------
# live Serve
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    out = {}
    for seed in (1, 2, 3):
        url = str(root / f"seed{seed}")
        save_served_model(_seeded_mlp(seed), url, MLP, {}, step=seed)
        out[url] = _seeded_mlp(seed)
    bad = str(root / "exploding")
    save_served_model(exploding_mlp(), bad, "tests.test_serve:exploding_mlp", {})
    return out, bad


@pytest.fixture(scope="module")
def serve_port(_s3_env):
    from ray import serve
    _start_local_ray()
    serve.shutdown()  # a Serve left by another module may listen elsewhere
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _spec(port, name="serve-test", route="/predict", **extra):
    data = {"kind": "serve", "name": name, "checkpoint_url": "unused", "model": {"factory": MLP},
            "input_shape": [32], "max_request_examples": 64, "http_port": port, "route_prefix": route,
            "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": 0.25},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}}
    data.update(extra)
    return parse_spec(data)


@pytest.fixture(scope="module")
def app(serve_port, checkpoints):
    from jobs.serve import deploy
    models, _ = checkpoints
    spec = _spec(serve_port)
    url = deploy(spec, next(iter(models)))
    return spec, url, models


def _post(url, inputs, **kw):
    import requests
    return requests.post(url, json={"inputs": np.asarray(inputs).tolist()}, timeout=30, **kw)


class _Load:
    """Client threads posting one example each until stopped (bounded by ``max_per_thread``)."""

    def __init__(self, url, threads=3, max_per_thread=20_000):
        self.url, self.stop = url, threading.Event()
        self.x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
        # (status, model_version, outputs, sent at, answered at): wall-clock seconds
        self.results: list[tuple[int, str | None, list | None, float, float]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(max_per_thread,), daemon=True)
                         for _ in range(threads)]

    def _run(self, n):
        import requests
        with requests.Session() as s:
            for _ in range(n):
                if self.stop.is_set():
                    return
                sent = time.time()
                try:
                    r = s.post(self.url, json={"inputs": self.x.tolist()}, timeout=30)
                    body = r.json()
                    rec = (r.status_code, body.get("model_version"), body.get("outputs"), sent, time.time())
                except Exception as e:  # noqa: BLE001 - a connection failure is a failed request
                    rec = (-1, repr(e), None, sent, time.time())
                with self._lock:
                    self.results.append(rec)

    def versions_since(self, start: int) -> set:
        with self._lock:
            return {r[1] for r in self.results[start:]}

    def versions(self) -> set:
        with self._lock:
            return {r[1] for r in self.results}

    def canary_fraction(self, version: str, start: float, end: float) -> tuple[float, int]:
        """Share of requests sent at or after ``start`` and answered by ``end`` that ``version``
        answered, and how many such requests there were."""
        with self._lock:
            window = [r[1] for r in self.results if r[3] >= start and r[4] <= end]
        return (sum(v == version for v in window) / len(window) if window else 0.0), len(window)

    def __enter__(self):
        for t in self._threads:
            t.start()
        wait_until(lambda: len(self.results) >= 10, 60, what="load to start")
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def failures(self):
        return [r[:2] for r in self.results if r[0] != 200]


def test_predictions_equal_the_models_own_forward(app):
    spec, url, models = app
    from jobs.serve import served
    version = served(spec)["stable"]
    assert served(spec)["graph"] == {"stable": "torchscript"}  # graph_mode auto: the mlp traces
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    r = _post(url, x)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == version
    np.testing.assert_allclose(r.json()["outputs"], _forward(models[version], x), rtol=1e-5, atol=1e-6)
    big = np.random.default_rng(2).standard_normal((40, 32))  # > max_batch_size: bypasses the queue
    np.testing.assert_allclose(_post(url, big).json()["outputs"], _forward(models[version], big),
                               rtol=1e-5, atol=1e-6)


def test_without_direct_ingress_there_are_no_replica_endpoints(app):
    from jobs.serve import replica_endpoints
    assert replica_endpoints(app[0]) == []


def test_on_a_running_ray_without_haproxy_the_endpoint_falls_back_to_the_proxy_and_says_why(app):
    """The session's Ray was started without Serve's ingress flags: ``ingress: auto`` cannot change
    that, so the port is Serve's proxy, and the endpoint says so, why, and how to get HAProxy."""
    from actors.serve.ingress import FAST_ENV
    spec, url, _ = app
    assert spec.ingress == "auto" and url.ingress == "proxy"
    assert url.note.startswith("Serve's HTTP proxy; fell back from HAProxy because the running Ray "
                               "cluster this joined was started without RAY_SERVE_ENABLE_HA_PROXY=1")
    assert FAST_ENV in url.note


def test_ingress_haproxy_that_cannot_be_had_is_refused_naming_the_field_before_deploying(
        app, checkpoints, tmp_path, monkeypatch, capsys):
    import ray
    import yaml
    from ray import serve
    from jobs.serve import deploy, main
    from orchestrator.spec import SpecError
    spec = _spec(app[0].http_port, name="serve-haproxy", route="/haproxy", ingress="haproxy")
    ckpt = next(iter(checkpoints[0]))
    with pytest.raises(SpecError) as e:  # the running Ray has no HAProxy ingress
        deploy(spec, ckpt)
    assert [f for f, _ in e.value.errors] == ["ingress"] and "RAY_SERVE_ENABLE_HA_PROXY=1" in str(e.value)
    assert "serve-haproxy" not in serve.status().applications
    # where jobs.serve would start Ray itself, a HAProxy binary that does not run stops it first
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a refused spec"))
    assert main([str(path), "--checkpoint", ckpt]) == 2
    assert "  ingress: haproxy: RAY_SERVE_HAPROXY_BINARY_PATH=" in capsys.readouterr().err


_INGRESS_SCRIPT = """
import json, os, sys
import numpy as np, psutil, requests, torch
from actors.served_model import load_served_model
from jobs.serve import main, replica_endpoints
from orchestrator.spec import load_spec
spec = load_spec(sys.argv[1])
assert main([sys.argv[1], "--detach"]) == 0  # as a user runs it: jobs.serve starts Ray itself
endpoint = f"http://127.0.0.1:{spec.http_port}{spec.route_prefix}"
direct = replica_endpoints(spec)
x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
key = {"x-api-key": os.environ["DIRECT_KEY"]}
out = {"direct": direct}
for name, url in [("endpoint", endpoint)] + [("replica", u) for u in direct]:
    r = requests.post(url, json={"inputs": x.tolist()}, headers=key)
    out[name] = [r.status_code, r.json()["outputs"],
                 requests.post(url, json={"inputs": x.tolist()}).status_code,
                 requests.post(url, json={"inputs": [[1.0, 2.0]]}, headers=key).status_code]
with torch.inference_mode():
    out["model"] = load_served_model(spec.checkpoint_url)(torch.from_numpy(x)).tolist()
out["haproxy_listens"] = any(c.status == psutil.CONN_LISTEN and c.laddr.port == spec.http_port
                             for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"
                             for c in p.net_connections("tcp"))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("haproxy", ["runs", "missing"])
def test_jobs_serve_starting_ray_serves_the_port_through_haproxy_else_direct_ingress(tmp_path, haproxy):
    """``python -m jobs.serve`` with the default ``ingress: auto``, where it starts Ray itself:
    Serve's port is HAProxy, forwarding to the replica's own port; where HAProxy does not run, it
    falls back to direct ingress (Serve's proxy on the port, each replica on its own) and says so.
    Either way the port (and the replica port) give the model's answers, the API key check and
    the 4xx validation."""
    import os
    import subprocess
    import sys

    import yaml
    ckpt = str(tmp_path / "ckpt")
    save_served_model(mlp(in_dim=32), ckpt, "jobs.examples.models:mlp", {"in_dim": 32})
    spec = {"kind": "serve", "name": "ingress", "checkpoint_url": ckpt,
            "model": {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 32}},
            "input_shape": [32], "http_port": free_port(), "api_key_env": "DIRECT_KEY",
            "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": 0.5}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(spec))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # RAY_ADDRESS=local: a new local Ray, as with no address where no `ray start` cluster runs
    env = dict(os.environ, PYTHONPATH=root, DIRECT_KEY="s3cret", RAY_ADDRESS="local")
    if haproxy == "missing":
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(tmp_path / "no-haproxy")
    proc = subprocess.run([sys.executable, "-c", _INGRESS_SCRIPT, str(tmp_path / "serve.yaml")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    out = json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[len("RESULT "):])
    said = next(ln for ln in lines if ln.startswith("  ingress: "))
    if haproxy == "runs":  # Serve lists only its front door, HAProxy, which holds the port
        assert said == ("  ingress: HAProxy (Serve's HAProxy ingress), forwarding each request straight "
                        "to a replica's own port")
        assert out["direct"] == [] and out["haproxy_listens"]
    else:
        assert said.startswith("  ingress: Serve's HTTP proxy; each replica also answers on its own port "
                               "(direct ingress); fell back from HAProxy because RAY_SERVE_HAPROXY_BINARY_PATH=")
        assert len(out["direct"]) == 1 and out["direct"][0].startswith("http://127.0.0.1:")
        assert not out["haproxy_listens"]
    for name in ["endpoint"] + (["replica"] if out["direct"] else []):
        status, outputs, no_key, bad_shape = out[name]
        assert (status, no_key, bad_shape) == (200, 401, 400), name
        np.testing.assert_allclose(outputs, out["model"], rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_batched(app):
    spec, url, models = app
    from jobs.serve import served
    before = served(spec)["batch_sizes"]
    xs = np.random.default_rng(3).standard_normal((48, 1, 32)).astype(np.float32)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda x: _post(url, x), xs))
    info = served(spec)
    assert all(r.status_code == 200 for r in replies)
    for x, r in zip(xs, replies):
        np.testing.assert_allclose(r.json()["outputs"], _forward(models[info["stable"]], x), rtol=1e-5, atol=1e-6)
    new = {int(k): v - before.get(k, 0) for k, v in info["batch_sizes"].items() if v > before.get(k, 0)}
    assert max(new) > 1, f"no batch held more than one request: {new}"
    assert max(new) <= spec.batching.max_batch_size


def test_bad_requests_get_4xx_and_the_replica_stays_healthy(app):
    import requests
    from ray import serve
    from jobs.serve import served
    spec, url, _ = app
    pid = served(spec)["pid"]
    cases = [
        (b"{nope", 400, "not valid JSON"),
        (_body({"inputs": [[1.0] * 31]}), 400, "expected [1, 32]"),
        (_body({"inputs": [["x"] * 32]}), 400, "got strings"),
        (_body({"inputs": [[1.0] * 32] * 65}), 413, "limit is 64"),
        (_body({"data": []}), 400, '{"inputs"'),
    ]
    for body, status, words in cases:
        r = requests.post(url, data=body, timeout=30)
        assert r.status_code == status and words in r.json()["error"], (body[:40], r.status_code, r.text)
    assert requests.get(url, timeout=30).status_code == 405
    assert _post(url, np.zeros((1, 32))).status_code == 200
    assert served(spec)["pid"] == pid  # same replica: nothing restarted it
    serve.get_app_handle(spec.name).check_health.remote().result()
    assert serve.status().applications[spec.name].status == "RUNNING"


def _raw_request(port: int, head: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    """Send ``head`` and ``body`` on a raw connection (no more: a client that stops here), then
    read the reply; ``(status, JSON body)``. A server that waited for more would time out."""
    import http.client
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        reply = http.client.HTTPResponse(s)
        reply.begin()
        return reply.status, json.loads(reply.read())


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(app):
    spec, url, _ = app
    limit = InputSchema(tuple(spec.input_shape), spec.input_dtype, spec.max_request_examples).max_body_bytes
    head = (f"POST {spec.route_prefix} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
            f"Content-Length: 20000000\n")
    # 1 KB of a declared 20 MB: the 413 comes without the rest
    status, reply = _raw_request(spec.http_port, head, b'{"inputs": [[' + b"0, " * 300)
    assert status == 413 and f"20000000 bytes; the limit is {limit}" in reply["error"], reply
    assert _post(url, np.zeros((1, 32))).status_code == 200


def test_a_chunked_body_is_read_only_up_to_the_limit(app):
    spec, url, _ = app
    limit = InputSchema(tuple(spec.input_shape), spec.input_dtype, spec.max_request_examples).max_body_bytes
    head = (f"POST {spec.route_prefix} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
            "Transfer-Encoding: chunked\n")
    chunk = b" " * 8192
    n = limit // len(chunk) + 2
    # past the limit, and no last chunk: the server must answer before the body ends
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(n))
    status, reply = _raw_request(spec.http_port, head, body)
    assert status == 413 and f"the limit is {limit}" in reply["error"], reply
    assert _post(url, np.zeros((1, 32))).status_code == 200


def test_a_body_that_is_not_json_is_refused_with_415_and_json_with_a_charset_is_served(app):
    import requests
    spec, url, _ = app
    body = _body({"inputs": [[0.0] * 32]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        r = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
    for headers in ({"Content-Type": "application/json; charset=utf-8"}, {}):  # none: read as JSON
        r = requests.post(url, data=body, headers=headers, timeout=30)
        assert r.status_code == 200 and len(r.json()["outputs"]) == 1, (headers, r.text)


def test_the_serve_example_serves_a_training_checkpoint_over_http(serve_port, tmp_path, capsys):
    """``python -m jobs.serve jobs/examples/mlp_serve.yaml`` pointed at a training checkpoint (as
    the example is): exported before deploying, then served over HTTP."""
    import requests
    import yaml
    from ray import serve
    from jobs.serve import main
    model = _seeded_mlp(8)
    root = str(tmp_path / "ckpt")
    _training_checkpoint(root, model)
    spec = yaml.safe_load(open(os.path.join(EXAMPLES, "mlp_serve.yaml")))
    # the running Serve's port (it keeps its own), a route of its own (the module's app has
    # /predict), this test's checkpoint, one small replica
    spec.update(checkpoint_url=root, http_port=serve_port, route_prefix="/example",
                replicas={**spec["replicas"], "max_replicas": 1, "cpus_per_replica": 0.25})
    path = tmp_path / "mlp_serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        assert main([str(path), "--detach"]) == 0
        out = capsys.readouterr().out
        served = str(tmp_path / "ckpt" / "served" / "step-00000007")
        assert f"to {served} (orchestrator export)" in out and f"serving {served} at " in out, out
        x = np.random.default_rng(8).standard_normal((3, 32)).astype(np.float32)
        r = requests.post(f"http://127.0.0.1:{serve_port}{spec['route_prefix']}",
                          json={"inputs": x.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"], _forward(model, x), rtol=1e-5, atol=1e-6)
    finally:
        serve.delete(spec["name"])


def test_api_key_is_required_when_configured(serve_port, checkpoints, monkeypatch):
    from ray import serve
    from jobs.serve import deploy
    models, _ = checkpoints
    monkeypatch.setenv("SERVE_TEST_KEY", "k-123")
    spec = _spec(serve_port, name="serve-key", route="/secure", api_key_env="SERVE_TEST_KEY", access_log=True)
    url = deploy(spec, next(iter(models)))
    try:
        x = np.zeros((1, 32))
        assert _post(url, x).status_code == 401
        assert "missing API key" in _post(url, x).json()["error"]
        assert _post(url, x, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(url, x, headers={"Authorization": "Bearer k-123"}).status_code == 200
        assert _post(url, x, headers={"x-api-key": "k-123"}).status_code == 200
        # access_log: true, so this replica logs each request
        wait_until(lambda: "POST /secure" in _replica_log(spec.name), 30, what="the access log line")
    finally:
        serve.delete(spec.name)


def _serve_series(metrics_url: str, app: str) -> dict[tuple, float]:
    """``{(series, arm, code|gate|outcome|le...): value}`` summed over Ray's own labels (worker,
    node), for one application's samples on the node's Prometheus endpoint."""
    from orchestrator.metrics import scrape
    out: dict[tuple, float] = {}
    for s in scrape([metrics_url]):
        if s.labels.get("app") != app:
            continue
        key = (s.name, *(f"{k}={s.labels[k]}" for k in ("arm", "code", "gate", "outcome", "le") if k in s.labels))
        out[key] = out.get(key, 0.0) + s.value
    return out


def test_replica_exports_requests_by_code_and_arm_latency_and_batches(app, metrics_url):
    """Good requests and refused ones reach the node's Prometheus endpoint: counted by code and
    arm (``none`` for a request refused before routing), one latency observation per request,
    batch sizes, forward time per example, queue depth and canary share."""
    import requests
    spec, url, _ = app
    n = 24
    xs = np.random.default_rng(5).standard_normal((n, 1, 32)).astype(np.float32)
    with ThreadPoolExecutor(8) as pool:
        assert [r.status_code for r in pool.map(lambda x: _post(url, x), xs)] == [200] * n
    assert requests.post(url, data=b"{nope", timeout=30).status_code == 400
    assert _post(url, np.zeros((65, 32))).status_code == 413
    req, lat = "ray_orchestrator_serve_requests_total", "ray_orchestrator_serve_latency_ms"

    last: dict = {}

    def exported():
        got = last["got"] = _serve_series(metrics_url, spec.name)
        per_arm: dict[str, float] = {}
        for key, v in got.items():
            if key[0] == req:
                per_arm[key[1]] = per_arm.get(key[1], 0.0) + v
        done = (got.get((req, "arm=stable", "code=200"), 0) >= n
                and got.get((req, "arm=none", "code=400"), 0) >= 1
                and got.get((req, "arm=none", "code=413"), 0) >= 1
                # one latency observation per answered request, in the same flush
                and all(got.get((lat + "_count", arm), -1) == c for arm, c in per_arm.items()))
        return got if done else None

    try:
        got = wait_until(exported, 60, 0.5, "serve metrics on the node's Prometheus endpoint")
    except AssertionError as e:
        shown = {k: v for k, v in last.get("got", {}).items() if not k[0].endswith("_bucket")}
        raise AssertionError(f"{e}; last scraped: {shown}") from None
    assert got[(lat + "_bucket", "arm=stable", "le=+Inf")] == got[(lat + "_count", "arm=stable")]
    # (Ray's agent rebuilds a histogram's _sum from bucket midpoints: only counts are exact)
    assert 1 <= got[("ray_orchestrator_serve_batch_size_count", "arm=stable")] <= n
    assert got[("ray_orchestrator_serve_forward_ms_per_example", "arm=stable")] > 0
    assert ("ray_orchestrator_serve_queue_depth", "arm=stable") in got
    assert got[("ray_orchestrator_serve_canary_share",)] == 0.0
    assert not any(k[0] == req and k[1] not in ("arm=stable", "arm=canary", "arm=none") for k in got)


def _replica_log(app: str) -> str:
    """Everything the replicas of ``app`` wrote to their Serve log files on this machine."""
    import glob
    import os

    import ray
    logs = ray._private.worker._global_node.get_logs_dir_path()
    return "".join(open(f, errors="replace").read()
                   for f in glob.glob(os.path.join(logs, "serve", f"replica_{app}_*.log")))


def test_requests_are_not_access_logged_by_default(app):
    spec, url, _ = app
    assert _post(url, np.zeros((1, 32))).status_code == 200
    text = _replica_log(spec.name)
    assert text, "no replica log found"  # the replica logs its start-up there
    assert "POST /predict" not in text


def _other(models, *exclude):
    return next(u for u in models if u not in exclude)


@pytest.mark.slow
def test_rolling_update_under_load_fails_no_request(app):
    from jobs.serve import rollout, served
    spec, url, models = app
    old = served(spec)["stable"]
    new = _other(models, old)
    with _Load(url) as load:
        result = rollout(spec, new, canary=False)
        mark = len(load.results)
        wait_until(lambda: len(load.results) > mark + 20 and load.versions_since(mark + 20) == {new},
                   60, what="only the new checkpoint to answer")
    assert result.decision == "promote" and result.serving_url == new
    assert load.failures() == []
    assert load.versions() == {old, new}
    np.testing.assert_allclose(load.results[-1][2], _forward(models[new], load.x), rtol=1e-5, atol=1e-6)


def _variant(root, stable_model, name: str, factory: str = MLP, kwargs: dict | None = None,
             weights: torch.nn.Module | None = None) -> str:
    """A served checkpoint at ``root/name`` built by ``factory`` carrying ``stable_model``'s weights
    (under ``net.`` for the fake models that wrap an mlp), or ``weights``' own."""
    import importlib
    mod, fn = factory.split(":")
    model = getattr(importlib.import_module(mod), fn)(**(kwargs or {}))
    target = getattr(model, "net", model)
    target.load_state_dict((weights or stable_model).state_dict())
    url = str(root / f"{name}-{time.monotonic_ns()}")
    save_served_model(model, url, factory, kwargs or {})
    return url


def _open_loop(urls: list[str], rate_per_url: float, seconds: float):
    """Requests sent on a fixed schedule (``rate_per_url`` a second to each URL, interleaved),
    whatever the replies do. Returns, per URL, each reply's ``(model_version, latency from its
    scheduled send, answered at)`` (version ``"failed: ..."`` for a failed request), and when the
    schedule ended (``time.monotonic()``)."""
    import requests
    local = threading.local()
    out: dict[str, list] = {u: [] for u in urls}
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32).tolist()

    def one(u, due):
        if not hasattr(local, "s"):
            local.s = requests.Session()
        s = local.s
        try:
            r = s.post(u, json={"inputs": x}, timeout=30)
            v = r.json()["model_version"] if r.status_code == 200 else f"failed: {r.status_code}"
        except Exception as e:  # noqa: BLE001 - a failed request is recorded, not raised
            v = f"failed: {e!r}"
        now = time.monotonic()
        out[u].append((v, now - due, now))

    step = 1.0 / (rate_per_url * len(urls))
    with ThreadPoolExecutor(32) as pool:
        t0 = time.monotonic()
        for k in range(int(seconds / step)):
            due = t0 + k * step
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the schedule, not waiting for a result
            pool.submit(one, urls[k % len(urls)], due)
        end = t0 + seconds
    return out, end


@pytest.mark.slow
def test_a_canary_100ms_slower_at_25_percent_leaves_stables_latency_and_throughput_alone(app, tmp_path):
    """Two applications serve the same stable checkpoint side by side under one interleaved
    open-loop load (so the machine's noise hits both alike): the module's (no canary) and one
    with a canary 100 ms slower at 25%. Stable's p95 there stays within 1.2x + 5 ms of the
    other's, and stable answers its share (75%) of the same offered rate within 10%."""
    from ray import serve

    from actors.serve.deployment import user_config
    from jobs.serve import _apply, _checked, deploy, served
    spec, url, models = app
    stable = served(spec)["stable"]
    iso = _spec(spec.http_port, name="serve-iso", route="/iso")
    iso_url = deploy(iso, stable)
    slow = _variant(tmp_path, models[stable], "slow", "tests.fake_models:slow_mlp", {"delay_s": 0.1})
    try:
        _apply(iso, user_config(iso, _checked(iso, stable, iso.model),
                                _checked(iso, slow, ModelRef(factory="tests.fake_models:slow_mlp",
                                                             kwargs={"delay_s": 0.1})), 0.25))
        assert served(iso)["canary"] == slow
        _open_loop([url, iso_url], 20, 2)                  # warm-up
        rate, seconds = 30, 10
        got, end = _open_loop([url, iso_url], rate, seconds)
    finally:
        serve.delete(iso.name)
    assert not [v for rs in got.values() for v, _, _ in rs if v.startswith("failed")]
    base = [lat for v, lat, _ in got[url]]
    with_canary = [lat for v, lat, _ in got[iso_url] if v == stable]
    # throughput: replies in the load's time, a slowed arm answers fewer of them
    base_done = sum(at <= end for _, _, at in got[url])
    stable_done = sum(at <= end for v, _, at in got[iso_url] if v == stable)
    canary = [lat for v, lat, _ in got[iso_url] if v == slow]
    p95 = lambda xs: float(np.percentile(xs, 95))  # noqa: E731
    figures = {"base_p95_ms": p95(base) * 1e3, "stable_p95_ms": p95(with_canary) * 1e3,
               "canary_p95_ms": p95(canary) * 1e3, "base_n": len(base), "stable_n": len(with_canary),
               "canary_n": len(canary), "base_per_s": base_done / seconds, "stable_per_s": stable_done / seconds}
    assert figures["canary_p95_ms"] >= 100, figures       # the canary was slow, and served
    assert figures["stable_p95_ms"] <= 1.2 * figures["base_p95_ms"] + 5, figures
    assert stable_done >= 0.9 * 0.75 * base_done, figures
    print("isolation figures:", figures)


@pytest.mark.slow
def test_a_good_canary_is_promoted_through_every_stage_and_clients_see_each_stages_share(app, tmp_path):
    """A retrained copy as good as stable (here: its very weights) goes 10% -> 50% -> 100%; the
    share of replies that clients get from it follows the steps; no client request fails."""
    from jobs.serve import rollout, served
    spec, url, models = app
    old = served(spec)["stable"]
    new = _variant(tmp_path, models[old], "same-weights")
    # p95 widened: the same model on a loaded 2-core machine; the p95 gate has its own test
    cfg = Canary(steps=[10, 50, 100], min_requests=30, min_stage_s=1, max_p95_slowdown=2.0,
                 quality={"mirror_share": 0.5, "min_examples": 20})
    with _Load(url) as load:
        result = rollout(spec, new, canary=cfg, timeout_s=120)
        models[new] = models[old]  # what the module's app serves from now on
        mark = len(load.results)
        wait_until(lambda: len(load.results) > mark + 20 and load.versions_since(mark + 20) == {new},
                   60, what="the promoted checkpoint to answer")
    assert result.decision == "promote", result
    assert [s["percent"] for s in result.stages] == [10, 50]
    assert result.reason == "promote: passed stages 10%, 50%"
    for stage, (low, high) in zip(result.stages, [(0.02, 0.25), (0.3, 0.7)]):
        share, n = load.canary_fraction(new, stage["started_at"], stage["ended_at"])
        assert n >= 30 and low <= share <= high, (stage["percent"], share, n)
        assert stage["canary"]["requests"] >= 30 and stage["held_s"] >= 1
        assert {g["name"] for g in stage["gates"]} == {"error_rate", "p95_latency_ms", "quality_agreement"}
        assert all(g["passed"] for g in stage["gates"])
    assert result.stages[-1]["quality"]["agreement"] == 1.0
    assert load.failures() == []
    assert served(spec)["stable"] == new and served(spec)["canary"] is None


@pytest.mark.slow
def test_a_canary_with_scrambled_weights_is_rolled_back_by_the_quality_gate(app, tmp_path):
    """Same architecture and speed, random weights: no errors, garbage predictions."""
    from jobs.serve import rollout, served
    spec, url, models = app
    old = served(spec)["stable"]
    scrambled = _variant(tmp_path, models[old], "scrambled", weights=_seeded_mlp(99))
    cfg = Canary(steps=[50, 100], min_requests=10, min_stage_s=0, max_p95_slowdown=2.0,
                 quality={"mirror_share": 1.0, "min_examples": 30})
    with _Load(url) as load:
        result = rollout(spec, scrambled, canary=cfg, timeout_s=120)
    assert result.decision == "rollback" and result.serving_url == old, result
    failed = [g for g in result.stages[-1]["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["quality_agreement"], result.stages
    assert failed[0]["canary"] < 0.9 and "quality_agreement" in result.reason
    assert load.failures() == []
    assert served(spec)["stable"] == old and served(spec)["canary"] is None


def test_a_canary_less_accurate_on_the_eval_set_is_rolled_back_before_any_traffic(app, tmp_path):
    from jobs.serve import rollout, served
    spec, url, models = app
    old = served(spec)["stable"]
    x = np.random.default_rng(4).standard_normal((500, 32)).astype(np.float32)
    np.savez(str(tmp_path / "eval.npz"), x=x, y=_forward(models[old], x).argmax(-1))  # stable: 100%
    scrambled = _variant(tmp_path, models[old], "scrambled", weights=_seeded_mlp(98))
    cfg = Canary(quality={"eval_set": str(tmp_path / "eval.npz"), "max_accuracy_drop": 0.05})
    result = rollout(spec, scrambled, canary=cfg)
    assert result.decision == "rollback" and result.serving_url == old, result
    (stage,) = result.stages
    (gate,) = stage["gates"]
    assert stage["stage"] == "eval_set" and gate["name"] == "eval_accuracy" and not gate["passed"]
    assert gate["stable"] == 1.0 and gate["canary"] < 0.95 and gate["limit"] == pytest.approx(0.95)
    assert result.reason.startswith("rollback before any traffic: eval_accuracy")
    assert served(spec)["canary"] is None


@pytest.mark.slow
def test_a_canary_100ms_slower_is_rolled_back_by_p95_in_each_of_10_trials(app, tmp_path):
    from jobs.serve import rollout, served
    spec, url, models = app
    old = served(spec)["stable"]
    slow = _variant(tmp_path, models[old], "slow", "tests.fake_models:slow_mlp", {"delay_s": 0.1})
    slow_ref = ModelRef(factory="tests.fake_models:slow_mlp", kwargs={"delay_s": 0.1})
    cfg = Canary(steps=[25, 100], min_requests=20, min_stage_s=0, quality=None)
    outcomes = []
    with _Load(url) as load:
        for _ in range(10):
            result = rollout(spec, slow, canary=cfg, timeout_s=60, model=slow_ref)
            failed = [g["name"] for g in result.stages[-1]["gates"] if not g["passed"]]
            outcomes.append((result.decision, failed, result.stages[-1]["canary"]["p95_latency_ms"],
                             result.stages[-1]["stable"]["p95_latency_ms"]))
    assert all(d == "rollback" and "p95_latency_ms" in f for d, f, _, _ in outcomes), outcomes
    print("slow canary trials (decision, failed gates, canary p95 ms, stable p95 ms):", outcomes)
    assert load.failures() == []
    assert served(spec)["stable"] == old and served(spec)["canary"] is None


@pytest.mark.slow
def test_a_canary_that_fails_to_build_in_the_replicas_rolls_back_within_seconds_with_the_error(app, tmp_path):
    from jobs.serve import rollout, served
    spec, url, models = app
    old = served(spec)["stable"]
    broken = _variant(tmp_path, models[old], "broken", "tests.fake_models:fails_in_a_replica")
    with _Load(url) as load:
        t0 = time.monotonic()
        result = rollout(spec, broken, canary=Canary(min_requests=20), timeout_s=120,
                         model=ModelRef(factory="tests.fake_models:fails_in_a_replica"))
        took = time.monotonic() - t0
    assert result.decision == "rollback" and result.serving_url == old, result
    assert "needs a library the replica's node lacks" in result.reason, result.reason
    stage = result.stages[0]
    assert stage["percent"] == 1 and stage["build_errors"] and stage["canary"]["requests"] == 0
    # noticed on the stage's first polls, not at its timeout (the rest of the rollout's time is
    # Serve applying the two configs: 10+ s each on a loaded 2-core machine)
    assert stage["held_s"] < 5 and took < 120, (stage["held_s"], took)
    assert load.failures() == [] and load.versions() == {old}
    assert served(spec)["canary"] is None


@pytest.mark.slow
def test_canary_rolls_back_a_failing_checkpoint_and_clients_see_no_errors(app, checkpoints, metrics_url):
    from jobs.serve import rollout, served
    spec, url, models = app
    _, bad = checkpoints
    old = served(spec)["stable"]
    with _Load(url) as load:
        result = rollout(spec, bad, canary=Canary(share=0.3, min_requests=30), timeout_s=120,  # steps 30, 100
                         model=ModelRef(factory="tests.test_serve:exploding_mlp"))
    assert result.decision == "rollback", result
    assert result.canary["errors"] > 0 and result.stable["errors"] == 0
    assert result.serving_url == old
    assert load.failures() == []  # a failed canary forward is answered by the stable model
    assert load.versions() == {old}
    assert served(spec)["stable"] == old and served(spec)["canary"] is None
    # metrics: the gate's verdicts (from this driver), and the canary's failures as its 500s
    gate = "ray_orchestrator_serve_gate_decisions_total"
    want = [(gate, "gate=min_requests", "outcome=pass"), (gate, "gate=error_rate", "outcome=fail"),
            (gate, "gate=decision", "outcome=rollback"),
            ("ray_orchestrator_serve_requests_total", "arm=canary", "code=500")]
    got = wait_until(lambda: (g := _serve_series(metrics_url, spec.name)) and all(g.get(k, 0) >= 1 for k in want)
                     and g.get(("ray_orchestrator_serve_canary_share",)) == 0.0 and g,
                     60, 0.5, "canary gate metrics")
    assert (gate, "gate=p95_latency_ms", "outcome=pass") in got or (gate, "gate=p95_latency_ms", "outcome=fail") in got


def test_batcher_fills_the_next_batch_with_what_arrived_during_a_forward():
    """Unit: with a forward in progress, new requests wait for it and then go out together."""
    import asyncio

    from actors.serve.deployment import _Batcher, _Item, _Reply

    sizes: list[int] = []

    async def run(items):
        await asyncio.sleep(0.05)  # a forward
        return [_Reply(outputs=it.x * 2, version="v") for it in items]

    async def main():
        b = _Batcher(run, sizes.append)
        b.max_batch_size, b.wait_s = 8, 0.001
        first = asyncio.ensure_future(b.submit(_Item(np.ones((1, 2)), "stable", 0.0)))
        await asyncio.sleep(0.01)                       # the first batch (1 example) is running
        rest = [asyncio.ensure_future(b.submit(_Item(np.full((1, 2), i), "stable", 0.0))) for i in range(11)]
        gone = asyncio.ensure_future(b.submit(_Item(np.zeros((1, 2)), "stable", 0.0)))
        await asyncio.sleep(0)
        gone.cancel()                                   # a client that disconnects while queued
        replies = await asyncio.gather(first, *rest)
        assert [r.outputs[0, 0] for r in replies[1:]] == [2 * i for i in range(11)]

        async def broken(items):
            raise RuntimeError("forward exploded")
        b._run = broken
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit(_Item(np.ones((1, 2)), "stable", 0.0))
        b._run = run                                    # and the loop still serves afterwards
        assert (await b.submit(_Item(np.ones((1, 2)), "stable", 0.0))).outputs[0, 0] == 2

    asyncio.run(main())
    assert sizes[:3] == [1, 8, 3], sizes                # 11 arrived mid-forward: 8 (the cap) + 3


def test_batcher_runs_background_items_only_when_no_request_waits_and_drops_past_its_limit():
    """Unit: mirrored (background) items go out in batches of their own, after the queued
    requests; nobody waits for them; beyond ``background_limit`` examples they are dropped."""
    import asyncio

    from actors.serve.deployment import _Batcher, _Item, _Reply

    batches: list[list[str]] = []

    async def run(items):
        batches.append([it.role for it in items])
        await asyncio.sleep(0.02)
        return [_Reply(outputs=it.x, version="v") for it in items]

    async def main():
        b = _Batcher(run, lambda n: None)
        b.max_batch_size, b.wait_s, b.background_limit = 8, 0.001, 3
        first = asyncio.ensure_future(b.submit(_Item(np.ones((1, 2)), "canary", 0.0)))
        await asyncio.sleep(0.005)                      # the first batch is running
        assert [b.offer(_Item(np.ones((1, 2)), "mirror", 0.0)) for _ in range(4)] == [True] * 3 + [False]
        later = [asyncio.ensure_future(b.submit(_Item(np.ones((1, 2)), "canary", 0.0))) for _ in range(2)]
        await asyncio.gather(first, *later)
        while len(batches) < 3:
            await asyncio.sleep(0.005)

    asyncio.run(main())
    assert batches == [["canary"], ["canary", "canary"], ["mirror"] * 3], batches


def test_the_readme_canary_section_is_a_valid_canary_with_the_defaults_it_names():
    import os
    import re

    import yaml
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = re.search(r"```yaml\n(canary:\n.*?)```", text, re.S).group(1)
    assert _spec(8000, **yaml.safe_load(block)).canary == Canary()
