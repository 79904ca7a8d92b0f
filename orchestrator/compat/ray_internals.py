"""Every private Ray internal this project touches (Ray pinned to 2.60.x in pyproject.toml).

Each entry says what it is for, why no public API serves, and the public API to move to when one
appears. :func:`verify` checks all of them without starting Ray; ``tests/test_compat.py`` runs it
and the behaviour tests named in docs/ARCHITECTURE.md section 6 exercise them for real.

The Ray Train classes (:class:`NarrowingScalingPolicy`, :class:`RaisingFailurePolicy`,
:class:`PolicyTorchTrainer`) are built on first use (module ``__getattr__``): importing Ray Train
costs 1.6 s, which the scheduler and the CLI, which import this module, do not pay.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable

from orchestrator.compat import CompatError

ENGINE = "Ray"


def _fail(what: str, detail: str) -> CompatError:
    return CompatError(ENGINE, what, detail)


# -------------------------------------------------------------------------------- warm spares
# Why: Ray accepts ``worker_process_setup_hook`` only in a job's runtime env (the driver uploads it
# at ``ray.init``); a Ray Train worker group's or a loader actor's runtime env carries it as the
# environment variable it is translated to. Public API to move to: an actor-level setup hook.
def worker_setup_hook_env_var() -> str:
    from ray._private import ray_constants
    return ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


# Why: Ray starts idle workers ahead of need only for the driver's job at ``ray.init``
# (``_system_config`` prestart); there is no public call to start them for an actor's runtime env
# on a chosen node. This is the raylet RPC Ray's own prestart uses. Public API to move to: none
# announced.
def prestart_workers(node_address: str, node_port: int, job_id_hex: str, runtime_env: str,
                     count: int, keep_alive_s: float, timeout_s: float = 10.0) -> None:
    """Ask the raylet at ``node_address:node_port`` for ``count`` idle Python workers of job
    ``job_id_hex`` with the serialized ``runtime_env``, kept ``keep_alive_s`` while unused."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import (common_pb2, node_manager_pb2, node_manager_pb2_grpc,
                                    runtime_environment_pb2)
    channel = init_grpc_channel(f"{node_address}:{node_port}")
    try:
        stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        stub.PrestartWorkers(node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, job_id=bytes.fromhex(job_id_hex),
            runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env=runtime_env),
            keep_alive_duration_secs=max(1, int(keep_alive_s)), num_workers=count), timeout=timeout_s)
    finally:
        channel.close()


# -------------------------------------------------------------------------------- Ray Train v2
# Why: Train v2's controller health-check interval (how long a lost worker goes unnoticed) is read
# from this environment variable of the driver only; ``RunConfig`` has no field for it.
def train_health_check_env_var() -> str:
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR
    return HEALTH_CHECK_INTERVAL_S_ENV_VAR


def elastic_policy_logger() -> logging.Logger:
    """The stock elastic scaling policy's logger (it logs a no-news line at every resize check)."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy
    return logging.getLogger(ElasticScalingPolicy.__module__)


def unwrap_user_exception(e: BaseException) -> BaseException:
    """A Train worker's exception as raised in the train function. Why: Ray Train wraps it
    (``UserExceptionWithTraceback``) and exposes the original only as ``_base_exc``."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    if isinstance(e, UserExceptionWithTraceback):
        return e._base_exc
    return e


def _build_train_classes() -> dict[str, type]:
    # Why: Train v2 takes a scaling and a failure policy only from inside ``DataParallelTrainer``
    # (``create_scaling_policy`` / ``create_failure_policy`` passed to the private
    # ``_initialize_and_run_controller``); the policies' base classes and their hooks are private.
    # Public API to move to: a ``ScalingConfig``/``FailureConfig`` policy option (none in 2.60).
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    class NarrowingScalingPolicy(ElasticScalingPolicy):
        """Ray Train's elastic policy with every worker count it computes passed through
        ``narrow(n, for_request)``: ``for_request`` for the count it asks the cluster to reserve,
        otherwise the count it would start or resize to now (return -1 to wait)."""

        def narrow(self, n: int, for_request: bool) -> int:
            return n

        def _get_num_workers_for_resource_request(self) -> int:
            return self.narrow(super()._get_num_workers_for_resource_request(), True)

        def _count_possible_workers(self, reserved_resources) -> int:
            return self.narrow(super()._count_possible_workers(reserved_resources), False)

    class RaisingFailurePolicy(DefaultFailurePolicy):
        """Ray Train's failure policy, except that a failure ``ends_run(error)`` says a retry would
        repeat ends the run at once, and a retry tears the failed group down with bounded waits
        (:func:`bound_failed_group_teardown`; the policy runs in the controller's process)."""

        def ends_run(self, error: BaseException) -> bool:
            return False

        def make_decision(self, training_failed_error):
            if self.ends_run(training_failed_error):
                return FailureDecision.RAISE
            decision = super().make_decision(training_failed_error)
            if decision == FailureDecision.RETRY:
                bound_failed_group_teardown()
            return decision

    class PolicyTorchTrainer(TorchTrainer):
        """``TorchTrainer`` whose controller gets ``scaling_policy()`` / ``failure_policy()`` when
        they return one, and the stock policies otherwise."""

        def scaling_policy(self) -> Any | None:
            return None

        def failure_policy(self) -> Any | None:
            return None

        def _initialize_and_run_controller(self, **kwargs):
            for key, mine in (("scaling_policy", self.scaling_policy()),
                              ("failure_policy", self.failure_policy())):
                if mine is not None:
                    if key not in kwargs:
                        raise _fail(f"TrainController({key}=...)",
                                    "the trainer no longer passes it to its controller")
                    kwargs[key] = mine
            return super()._initialize_and_run_controller(**kwargs)

    out = {c.__name__: c for c in (NarrowingScalingPolicy, RaisingFailurePolicy, PolicyTorchTrainer)}
    for c in out.values():  # importable by name, so cloudpickle sends them by reference
        c.__module__, c.__qualname__ = __name__, c.__name__
    return out


_LAZY = ("NarrowingScalingPolicy", "RaisingFailurePolicy", "PolicyTorchTrainer")

# Why: after a failure, Ray Train tears the old group down before it starts the next, and waits on
# every worker for two calls: the torch backend's ``on_shutdown`` (destroy the process group,
# ``TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S``, default 30 s) and each worker actor's ``shutdown``
# (``worker_group.state._shutdown_workers``, ``patience_s=5``, not configurable). When a node is
# lost, the calls to its workers return only once Ray has declared them dead: 1.5 s and 2.0 s of a
# 9 s recovery on the bench (docs/BENCHMARKS.md, Train, "Rerun 2026-12-01"). A failed group's
# workers are killed right after and their state is in the last checkpoint, so a retry bounds both
# waits. Public API to move to: a Train option for the teardown patience (none in 2.60).
FAILED_GROUP_PATIENCE_S = 0.5   # each worker's shutdown() on a retried group
FAILED_GROUP_TORCH_SHUTDOWN_S = 1  # the backend's process group shutdown (whole seconds)


def bound_failed_group_teardown() -> None:
    """In the Train controller's process: bound the waits of the teardown that follows (a retry)."""
    from ray.train.constants import TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
    from ray.train.v2._internal.execution.worker_group import state
    state._shutdown_workers.__defaults__ = (FAILED_GROUP_PATIENCE_S,)
    os.environ[TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S] = str(FAILED_GROUP_TORCH_SHUTDOWN_S)


def __getattr__(name: str):
    if name in _LAZY:
        globals().update(_build_train_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -------------------------------------------------------------------------------- Ray Tune
# Why: a Tune trial that stops a Train run early must free its workers before Tune places the next
# trial; Train v2 has no public handle to abort a run started in another thread. The controller
# actor's handle comes from a public ``UserCallback`` (``get_runtime_context().current_actor``);
# its ``abort`` method is private.
def abort_train_run(controller, timeout_s: float) -> None:
    import ray
    ray.get(controller.abort.remote(), timeout=timeout_s)


# -------------------------------------------------------------------------------- Ray Serve
# Why: Ray 2.60 has no public API that says which ingress Serve runs, where its replicas listen, or
# which host its HTTP servers bind; the controller's target groups (what it feeds HAProxy and
# external load balancers) say all three. Public API to move to: none announced.
def serve_http_host() -> str:
    from ray.serve.context import _get_global_client
    return _get_global_client().http_config.host


def serve_target_groups(app: str | None, from_proxy_manager: bool) -> list:
    import ray
    from ray.serve.context import _get_global_client
    return ray.get(_get_global_client()._controller.get_target_groups.remote(
        app_name=app, from_proxy_manager=from_proxy_manager))


# Environment variables Serve reads (alpha features, no Python API): HAProxy and direct ingress, and
# running the replica's handler on its event loop. :func:`verify` checks Serve still reads them.
SERVE_ENV_VARS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
                  "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD")


# -------------------------------------------------------------------------------- Ray core
# Why: Ray provisions Grafana from its session directory (``metrics/grafana/dashboards``) and no
# public API says where that is for the Ray this process is connected to.
def session_dir() -> str | None:
    import ray
    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


# Why: the URL the cluster publishes for its dashboard lives in the GCS; ``ray.init``'s context
# copies it once at connect, and was once found empty in CI right after ``ray start``.
def dashboard_url_from_gcs() -> str | None:
    import ray
    return (ray._private.services.get_webui_url_from_internal_kv()
            or ray._private.worker.global_worker.node.address_info.get("webui_url"))


# Why: the scheduler counts work it did not start (actors, `ray job submit`, other schedulers) by
# each node's *available* resources; Ray 2.60's public APIs give them cluster-wide only
# (``ray.available_resources``) or give per-node totals only (``ray.nodes()``,
# ``ray.util.state.list_nodes``). This is the GCS's per-node view behind ``ray status``
# (a DeveloperAPI in a private module). Public API to move to: a per-node available-resources
# column in ``ray.util.state.list_nodes`` (none announced).
def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Node id (hex) -> resource name -> amount available now, for every live node Ray reports.
    A resource at zero may be left out of a node's map."""
    from ray._private import state
    return {node: {k: float(v) for k, v in res.items()}
            for node, res in state.available_resources_per_node().items()}


# -------------------------------------------------------------------------------- verify
def _need(obj: Any, attr: str, where: str) -> Any:
    if not hasattr(obj, attr):
        raise _fail(f"{where}.{attr}", "is gone")
    return getattr(obj, attr)


def _params(fn: Callable, where: str, *names: str) -> None:
    have = inspect.signature(fn).parameters
    missing = [n for n in names if n not in have]
    if missing:
        raise _fail(where, f"no longer takes {', '.join(missing)} (takes {', '.join(have)})")


def verify() -> None:
    """Check every internal above is where this module expects it, with the shape it uses.
    Raises :class:`~orchestrator.compat.CompatError` naming the first that is not."""
    from ray._private import ray_constants, services, worker
    if not isinstance(_need(ray_constants, "WORKER_PROCESS_SETUP_HOOK_ENV_VAR", "ray._private.ray_constants"), str):
        raise _fail("WORKER_PROCESS_SETUP_HOOK_ENV_VAR", "is not a string")
    from ray._private import grpc_utils
    _need(grpc_utils, "init_grpc_channel", "ray._private.grpc_utils")
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    _need(node_manager_pb2_grpc.NodeManagerServiceStub, "__init__", "NodeManagerServiceStub")
    _need(common_pb2, "PYTHON", "common_pb2")
    fields = set(node_manager_pb2.PrestartWorkersRequest.DESCRIPTOR.fields_by_name)
    want = {"language", "job_id", "runtime_env_info", "keep_alive_duration_secs", "num_workers"}
    if not want <= fields:
        raise _fail("PrestartWorkersRequest", f"lacks fields {sorted(want - fields)}")
    if "PrestartWorkers" not in node_manager_pb2.DESCRIPTOR.services_by_name["NodeManagerService"].methods_by_name:
        raise _fail("NodeManagerService.PrestartWorkers", "is gone")

    from ray.train.v2._internal import constants, exceptions
    from ray.train.v2._internal.execution import failure_handling, scaling_policy
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    _need(constants, "HEALTH_CHECK_INTERVAL_S_ENV_VAR", "ray.train.v2._internal.constants")
    for name in ("_count_possible_workers", "_get_num_workers_for_resource_request"):
        _need(scaling_policy.ElasticScalingPolicy, name, "ElasticScalingPolicy")
    _params(scaling_policy.ElasticScalingPolicy._count_possible_workers,
            "ElasticScalingPolicy._count_possible_workers", "reserved_resources")
    _need(failure_handling.DefaultFailurePolicy, "make_decision", "DefaultFailurePolicy")
    _need(failure_handling.FailureDecision, "RAISE", "FailureDecision")
    _need(failure_handling.FailureDecision, "RETRY", "FailureDecision")
    from ray.train import constants as train_constants
    from ray.train.torch import config as torch_config
    from ray.train.v2._internal.execution.worker_group import state
    _need(train_constants, "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "ray.train.constants")
    backend = _need(torch_config, "_TorchBackend", "ray.train.torch.config")
    if "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S" not in inspect.getsource(backend.on_shutdown):
        raise _fail("_TorchBackend.on_shutdown", "no longer reads TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S")
    _params(_need(state, "_shutdown_workers", "ray.train.v2._internal.execution.worker_group.state"),
            "worker_group.state._shutdown_workers", "patience_s")
    if "_shutdown_workers(self.workers)" not in inspect.getsource(state.WorkerGroupState.shutdown):
        raise _fail("WorkerGroupState.shutdown", "no longer calls _shutdown_workers with its default patience")
    _need(DataParallelTrainer, "_initialize_and_run_controller", "DataParallelTrainer")
    _params(TrainController.__init__, "TrainController.__init__", "scaling_policy", "failure_policy")
    _need(TrainController, "abort", "TrainController")
    wrapped = exceptions.UserExceptionWithTraceback(ValueError("probe"), "traceback")
    if not isinstance(getattr(wrapped, "_base_exc", None), ValueError):
        raise _fail("UserExceptionWithTraceback._base_exc", "no longer holds the original exception")

    from ray.serve import context
    _need(context, "_get_global_client", "ray.serve.context")
    from ray.serve._private.client import ServeControllerClient
    _need(ServeControllerClient, "http_config", "ServeControllerClient")
    if "self._controller" not in inspect.getsource(ServeControllerClient.__init__):
        raise _fail("ServeControllerClient._controller", "is no longer set by the client")
    from ray.serve._private.controller import ServeController
    _params(_need(ServeController, "get_target_groups", "ServeController"),
            "ServeController.get_target_groups", "app_name", "from_proxy_manager")
    from ray.serve._private import constants as serve_constants
    source = inspect.getsource(serve_constants)
    for var in SERVE_ENV_VARS:
        if var not in source:
            raise _fail(f"environment variable {var}", "is no longer read by ray.serve._private.constants")

    from ray._private import state
    _need(state, "available_resources_per_node", "ray._private.state")
    _need(services, "get_webui_url_from_internal_kv", "ray._private.services")
    _need(worker, "global_worker", "ray._private.worker")
    _need(worker, "_global_node", "ray._private.worker")
    from ray._private.node import Node
    _need(Node, "get_session_dir_path", "ray._private.node.Node")
