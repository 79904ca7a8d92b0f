"""The cluster YAMLs in this directory, and their validation.

Two kinds of file live here:

* Ray cluster-launcher configs (``local.yaml``, ``aws.yaml``, ``gcp.yaml``), validated by Ray's own
  code: ``prepare_config`` fills the provider's defaults exactly as ``ray up`` does, then
  ``validate_config`` checks the result against Ray's ``ray-schema.json`` plus its cross-field
  rules. The ``fake_multinode`` provider is read raw by the head's autoscaler (Ray fills no
  defaults for it), so such a file is validated as written.
* KubeRay ``RayCluster`` manifests (``kuberay.yaml``). KubeRay's schema is a Kubernetes CRD that
  Ray does not ship, so the parts the operator and the autoscaler rely on are checked here.

Beside them, the scheduler service's supervisor files (``SERVICE_FILES``: a systemd unit and a
Kubernetes Deployment) are not cluster configs: ``cluster_yaml_paths`` leaves them out and
tests/test_cluster_yaml.py checks them.

Every failure is a ``ClusterConfigError`` naming the file, the field path and the reason.

    python -m cluster.configs                  # validate every YAML in cluster/
    python -m cluster.configs my-cluster.yaml  # or the files named
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CLUSTER_DIR = Path(__file__).resolve().parent
FAKE_HEAD_NODE_TYPE = "ray.head.default"  # the only head type name the fake_multinode provider knows
# Ray fills no defaults for fake_multinode and its autoscaler reads these keys of the file directly.
FAKE_REQUIRED_FIELDS = (
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider",
    "available_node_types", "head_node_type", "auth", "docker", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter",
)


# `orchestrator scheduler` under a supervisor: systemd on a Ray node, or a Kubernetes Deployment.
SERVICE_FILES = ("orchestrator-scheduler.service", "orchestrator-scheduler.k8s.yaml")


class ClusterConfigError(ValueError):
    """A cluster YAML is malformed; the message names the file, the field and the reason."""


def cluster_yaml_paths() -> list[Path]:
    """Every cluster YAML shipped in ``cluster/``, sorted by name."""
    return sorted(p for p in CLUSTER_DIR.glob("*.yaml") if p.name not in SERVICE_FILES)


def load(path: Union[str, os.PathLike]) -> dict:
    """Parse one YAML file into a dict; ClusterConfigError if it is not a YAML mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ClusterConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def is_kuberay(config: dict) -> bool:
    return "kind" in config or "apiVersion" in config


def validate(source: Union[str, os.PathLike, dict], name: Optional[str] = None) -> dict:
    """Validate a cluster YAML (a path or an already-loaded dict).

    Returns the config as its consumer will see it: for a cluster-launcher YAML, with Ray's
    provider defaults filled in (what ``ray up`` hands the autoscaler); a KubeRay manifest as is.
    Raises ClusterConfigError.
    """
    if isinstance(source, dict):
        config, name = copy.deepcopy(source), name or "<config>"
    else:
        config, name = load(source), name or str(source)
    if is_kuberay(config):
        return validate_raycluster(config, name)
    return validate_launcher_config(config, name)


# -----------------------------------------------------------------------------------------------
# Ray cluster launcher (ray up / ray start --autoscaling-config)
# -----------------------------------------------------------------------------------------------
def validate_launcher_config(config: dict, name: str = "<config>") -> dict:
    """Ray's own checks for a cluster-launcher config; returns the prepared config."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = config.get("provider")
    if not isinstance(provider, dict) or "type" not in provider:
        raise ClusterConfigError(f"{name}: provider.type: required (e.g. aws, gcp, fake_multinode)")
    if provider["type"] == "fake_multinode":
        missing = [k for k in FAKE_REQUIRED_FIELDS if k not in config]
        if missing:
            raise ClusterConfigError(f"{name}: {', '.join(missing)}: required (Ray fills no defaults "
                                     "for the fake_multinode provider; its autoscaler reads the file as is)")
    try:
        if provider["type"] == "fake_multinode":
            prepared = copy.deepcopy(config)
        else:
            prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        raise ClusterConfigError(f"{name}: {where}: {e.message}") from None
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ClusterConfigError(f"{name}: {e}") from None
    if provider["type"] == "fake_multinode" and prepared["head_node_type"] != FAKE_HEAD_NODE_TYPE:
        raise ClusterConfigError(f"{name}: head_node_type: the fake_multinode provider names its "
                                 f"head {FAKE_HEAD_NODE_TYPE!r}, got {prepared['head_node_type']!r}")
    return prepared


# -----------------------------------------------------------------------------------------------
# KubeRay RayCluster (ray.io/v1)
# -----------------------------------------------------------------------------------------------
# A Kubernetes resource quantity: "2", "500m", "8Gi", 1.5 ...
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class _K8s(BaseModel):
    # Manifests carry many fields KubeRay passes through to Kubernetes; only ours are checked.
    model_config = ConfigDict(extra="allow")


class _Resources(_K8s):
    limits: dict[str, Union[int, float, str]] = Field(default_factory=dict)
    requests: dict[str, Union[int, float, str]] = Field(default_factory=dict)

    @field_validator("limits", "requests")
    @classmethod
    def _quantities(cls, v: dict) -> dict:
        for key, q in v.items():
            if isinstance(q, bool) or not _QUANTITY.match(str(q)):
                raise ValueError(f"{key}: {q!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        return v


class _Container(_K8s):
    name: str
    image: str = Field(min_length=1)
    resources: _Resources


class _PodSpec(_K8s):
    containers: list[_Container] = Field(min_length=1)


class _PodTemplate(_K8s):
    spec: _PodSpec


class _GroupSpec(_K8s):
    # KubeRay's CRD types this map[string]string: `num-cpus: 0` (an int) is rejected by the API server.
    rayStartParams: dict[str, str] = Field(default_factory=dict)
    template: _PodTemplate

    @model_validator(mode="after")
    def _ray_container_has_shape(self):
        # The Ray container is containers[0]; the autoscaler reads a node's CPU and memory from it.
        ray_container = self.template.spec.containers[0]
        shape = {**ray_container.resources.requests, **ray_container.resources.limits}
        missing = [k for k in ("cpu", "memory") if k not in shape
                   and not (k == "cpu" and "num-cpus" in self.rayStartParams)]
        if missing:
            raise ValueError(f"template.spec.containers[0].resources: the Ray container needs "
                             f"limits for {', '.join(missing)} (the autoscaler sizes nodes from them)")
        return self


class _HeadGroupSpec(_GroupSpec):
    pass


class _WorkerGroupSpec(_GroupSpec):
    groupName: str = Field(min_length=1)
    replicas: Optional[int] = Field(default=None, ge=0)
    minReplicas: int = Field(default=0, ge=0)
    maxReplicas: int = Field(default=2147483647, ge=0)

    @model_validator(mode="after")
    def _replica_bounds(self):
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas ({self.minReplicas}) > maxReplicas ({self.maxReplicas})")
        if self.replicas is not None and not self.minReplicas <= self.replicas <= self.maxReplicas:
            raise ValueError(f"replicas ({self.replicas}) outside [minReplicas, maxReplicas] = "
                             f"[{self.minReplicas}, {self.maxReplicas}]")
        return self


class _AutoscalerOptions(_K8s):
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    idleTimeoutSeconds: int = Field(default=60, ge=0)
    resources: Optional[_Resources] = None


class _RayClusterSpec(_K8s):
    rayVersion: str = Field(min_length=1)
    enableInTreeAutoscaling: bool = False
    autoscalerOptions: Optional[_AutoscalerOptions] = None
    headGroupSpec: _HeadGroupSpec
    workerGroupSpecs: list[_WorkerGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_groups(self):
        names = [g.groupName for g in self.workerGroupSpecs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"workerGroupSpecs: duplicate groupName {', '.join(dupes)}")
        return self


class _Metadata(_K8s):
    name: str

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 63:
            raise ValueError(f"{v!r} is not a DNS-1123 label (lowercase letters, digits, '-')")
        return v


class RayClusterManifest(_K8s):
    """The parts of a KubeRay ``RayCluster`` that the operator and the Ray autoscaler rely on."""

    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayCluster"]
    metadata: _Metadata
    spec: _RayClusterSpec


def validate_raycluster(manifest: dict, name: str = "<manifest>") -> dict:
    """Structural check of a KubeRay RayCluster manifest; returns it unchanged."""
    try:
        RayClusterManifest.model_validate(manifest)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                 for err in e.errors()]
        raise ClusterConfigError(f"{name}: " + "; ".join(lines)) from None
    return manifest


def worker_types(config: dict) -> dict[str, Any]:
    """Worker node types with their autoscaling bounds: {name: (min, max, resources)}."""
    if is_kuberay(config):
        return {g["groupName"]: (g.get("minReplicas", 0), g.get("maxReplicas"),
                                 g["template"]["spec"]["containers"][0]["resources"].get("limits", {}))
                for g in config["spec"].get("workerGroupSpecs", [])}
    head = config["head_node_type"]
    return {t: (spec.get("min_workers", 0), spec.get("max_workers"), spec.get("resources", {}))
            for t, spec in config["available_node_types"].items() if t != head}


def main(argv: Optional[list[str]] = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or cluster_yaml_paths()
    failed = 0
    for path in paths:
        try:
            validate(path)
            print(f"ok      {path}")
        except ClusterConfigError as e:
            failed += 1
            print(f"invalid {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
