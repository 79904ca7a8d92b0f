"""The cluster YAMLs in this directory, and their validation.

Two kinds of file live here:

* Ray cluster-launcher configs (``local.yaml``, ``aws.yaml``, ``gcp.yaml``), validated by Ray's own
  code: ``prepare_config`` fills the provider's defaults exactly as ``ray up`` does, then
  ``validate_config`` checks the result against Ray's ``ray-schema.json`` plus its cross-field
  rules. The ``fake_multinode`` provider is read raw by the head's autoscaler (Ray fills no
  defaults for it), so such a file is validated as written.
* KubeRay ``RayCluster`` manifests (``kuberay.yaml``). KubeRay's schema is a Kubernetes CRD that
  Ray does not ship, so the parts the operator and the autoscaler rely on are checked here.

On top of the structure, what makes a cluster fit to share (checked for every cloud and KubeRay
config; ``fake_multinode`` runs on this machine and is started by ``cluster.local``):

* Ray's token authentication is on. Launcher YAMLs: every node's ``ray start`` runs with
  ``RAY_AUTH_MODE=token``, nothing sets another mode, and a token reaches every node
  (``~/.ray/auth_token`` in ``file_mounts``, or ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``). KubeRay:
  ``spec.authOptions.mode: token``, no container overriding ``RAY_AUTH_MODE``, and a ``ClusterIP``
  head service without an Ingress.
* Serve's fast ingress: ``RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the
  environment of every node's ``ray start`` (KubeRay: of every Ray container).
* AWS: every node type pins an ``ImageId`` (Ray's default AMI is Ubuntu 18.04, glibc 2.27, where
  torch 2.13's manylinux_2_28 wheels do not install), and not the example id ``aws.yaml`` ships with
  unless ``--allow-example-ami`` (or ``REO_ALLOW_EXAMPLE_AMI=1``) says so.

Beside them, the scheduler service's supervisor files (``SERVICE_FILES``: a systemd unit and a
Kubernetes Deployment) are not cluster configs: ``cluster_yaml_paths`` leaves them out and
tests/test_cluster_yaml.py checks them.

Every failure is a ``ClusterConfigError`` naming the file, the field path and the reason.

    python -m cluster.configs                  # validate every YAML in cluster/
    python -m cluster.configs my-cluster.yaml  # or the files named
    python -m cluster.configs --allow-example-ami   # accept aws.yaml's example ImageId
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
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

# Serve's fast ingress (actors/serve/ingress.py FAST_ENV): Serve reads it from the environment of the
# Ray processes, so it must be in that of `ray start` on every node.
SERVE_FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
AUTH_TOKEN_FILE = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes the token
# AWS: the AMI family every node type runs (Ubuntu 22.04: glibc 2.35, Python 3.10, an NVIDIA driver
# for the CUDA 12.8 torch wheel), and the example id aws.yaml ships with: the us-east-1 id AWS's DLAMI
# guide shows as sample output of its lookup command; not verified here, and ids change per release.
AWS_AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)"
AWS_EXAMPLE_AMI = "ami-09ee1a996ac214ce7"
ALLOW_EXAMPLE_AMI_ENV = "REO_ALLOW_EXAMPLE_AMI"


def aws_ami_lookup_command(region: str) -> str:
    """The command that prints the newest ``AWS_AMI_NAME`` image id (and name) in ``region``."""
    return (f"aws ec2 describe-images --region {region} --owners amazon "
            f"--filters 'Name=name,Values={AWS_AMI_NAME} *' 'Name=state,Values=available' "
            "--query 'sort_by(Images, &CreationDate)[-1].[ImageId,Name]' --output text")


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


def validate(source: Union[str, os.PathLike, dict], name: Optional[str] = None, *,
             allow_example_ami: Optional[bool] = None) -> dict:
    """Validate a cluster YAML (a path or an already-loaded dict).

    Returns the config as its consumer will see it: for a cluster-launcher YAML, with Ray's
    provider defaults filled in (what ``ray up`` hands the autoscaler); a KubeRay manifest as is.
    ``allow_example_ami`` (default: ``$REO_ALLOW_EXAMPLE_AMI``) accepts aws.yaml's example ImageId.
    Raises ClusterConfigError.
    """
    if isinstance(source, dict):
        config, name = copy.deepcopy(source), name or "<config>"
    else:
        config, name = load(source), name or str(source)
    if is_kuberay(config):
        return validate_raycluster(config, name)
    return validate_launcher_config(config, name, allow_example_ami=allow_example_ami)


# -----------------------------------------------------------------------------------------------
# Ray cluster launcher (ray up / ray start --autoscaling-config)
# -----------------------------------------------------------------------------------------------
def validate_launcher_config(config: dict, name: str = "<config>", *,
                             allow_example_ami: Optional[bool] = None) -> dict:
    """Ray's own checks for a cluster-launcher config, then this project's (token auth, Serve's
    ingress, the AWS image); returns the prepared config."""
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
    if provider["type"] != "fake_multinode":  # nodes this machine does not start itself
        _check_token_auth(prepared, name)
        _check_serve_ingress(prepared, name)
        if provider["type"] == "aws":
            _check_aws_images(prepared, name, allow_example_ami)
    return prepared


_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")


def ray_start_invocations(command: str) -> list[tuple[dict[str, str], list[str]]]:
    """Every ``ray start`` in a shell command line: ``(the variables in its environment that the
    line sets, its arguments)``. Counted: ``VAR=v ray start``, ``env VAR=v ray start`` and an earlier
    ``export VAR=v`` in the same line; a bare ``VAR=v;`` does not reach the child process."""
    exported: dict[str, str] = {}
    found = []
    for part in re.split(r";|&&|\|\||\n", command):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        if not words:
            continue
        if words[0] == "export":
            exported.update(m.groups() for w in words[1:] if (m := _ASSIGN.match(w)))
            continue
        i, prefix = (1 if words[0] == "env" else 0), {}
        while i < len(words) and (m := _ASSIGN.match(words[i])):
            prefix[m[1]] = m[2]
            i += 1
        if words[i:i + 2] == ["ray", "start"]:
            found.append(({**exported, **prefix}, words[i + 2:]))
    return found


def _commands(config: dict) -> list[tuple[str, str]]:
    """(field path, command) for every shell command the launcher runs on a node."""
    out = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", *_START_KEYS):
        out += [(f"{key}.{i}", c) for i, c in enumerate(config.get(key) or [])]
    for t, spec in (config.get("available_node_types") or {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            out += [(f"available_node_types.{t}.{key}.{i}", c) for i, c in enumerate(spec.get(key) or [])]
    return out


def _ray_starts(config: dict, name: str) -> list[tuple[str, dict[str, str], list[str]]]:
    starts = []
    for key in _START_KEYS:
        found = [(f"{key}.{i}", env, args) for i, c in enumerate(config.get(key) or [])
                 for env, args in ray_start_invocations(c)]
        if not found:
            raise ClusterConfigError(f"{name}: {key}: no `ray start` command")
        starts += found
    return starts


def _check_token_auth(config: dict, name: str) -> None:
    """Ray's token authentication on every node, and a token on every node."""
    for where, command in _commands(config):
        for mode in re.findall(r"\bRAY_AUTH_MODE=['\"]?([A-Za-z0-9_-]*)", command):
            if mode != "token":
                raise ClusterConfigError(
                    f"{name}: {where}: RAY_AUTH_MODE={mode} turns Ray's token authentication off; "
                    "on a cluster anyone who reaches the head (GCS port, dashboard, Jobs API) could "
                    "then run code on it")
    for where, env, args in _ray_starts(config, name):
        if env.get("RAY_AUTH_MODE") != "token":
            host = _flag(args, "--dashboard-host")
            exposed = (f" with --dashboard-host={host}" if host and host not in ("127.0.0.1", "localhost")
                       else "")
            raise ClusterConfigError(
                f"{name}: {where}: `ray start` runs without RAY_AUTH_MODE=token in its environment"
                f"{exposed}: Ray 2.60's `ray start` turns token authentication on only when that is "
                "set or a token already exists, so this node may accept unauthenticated requests "
                "(GCS, dashboard, Jobs API); write `RAY_AUTH_MODE=token ray start ...`")
        if "RAY_AUTH_TOKEN" in env or "RAY_AUTH_TOKEN_PATH" in env:
            continue
        mounts = {os.path.normpath(k) for k in config.get("file_mounts") or {}}
        if os.path.normpath(AUTH_TOKEN_FILE) not in mounts:
            raise ClusterConfigError(
                f"{name}: file_mounts: no Ray auth token reaches the nodes ({where} starts Ray with "
                f"RAY_AUTH_MODE=token, which refuses to start without one): add "
                f"`{AUTH_TOKEN_FILE}: {AUTH_TOKEN_FILE}` (create it once with "
                "`ray get-auth-token --generate`), or set RAY_AUTH_TOKEN_PATH for `ray start`")


def _check_serve_ingress(config: dict, name: str) -> None:
    for where, env, _ in _ray_starts(config, name):
        missing = [f"{k}={v}" for k, v in SERVE_FAST_INGRESS_ENV.items() if env.get(k) != v]
        if missing:
            raise ClusterConfigError(
                f"{name}: {where}: `ray start` runs without {' '.join(missing)} in its environment: "
                "Serve reads its ingress from the Ray processes' environment, so without it on "
                "every node Serve answers through its Python HTTP proxy instead of HAProxy")


def _check_aws_images(config: dict, name: str, allow_example_ami: Optional[bool]) -> None:
    if allow_example_ami is None:
        allow_example_ami = os.environ.get(ALLOW_EXAMPLE_AMI_ENV, "").lower() in ("1", "true", "yes")
    lookup = aws_ami_lookup_command(config["provider"].get("region") or "REGION")
    for t, spec in config["available_node_types"].items():
        where = f"available_node_types.{t}.node_config.ImageId"
        image = (spec.get("node_config") or {}).get("ImageId")
        if not image:
            raise ClusterConfigError(
                f"{name}: {where}: required: without it Ray launches its default AMI (Ubuntu 18.04, "
                f"glibc 2.27), where torch 2.13's manylinux_2_28 wheels do not install. Use "
                f"'{AWS_AMI_NAME}'; its current id for the region: {lookup}")
        if image == AWS_EXAMPLE_AMI and not allow_example_ami:
            raise ClusterConfigError(
                f"{name}: {where}: {image} is the example id cluster/aws.yaml ships with (us-east-1, "
                f"not verified, not for another region). Put the current '{AWS_AMI_NAME}' id for "
                f"provider.region there, from: {lookup}  (--allow-example-ami or "
                f"{ALLOW_EXAMPLE_AMI_ENV}=1 accepts it, to check the rest of the file)")


def _flag(args: list[str], flag: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


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


class _EnvVar(_K8s):
    name: str
    value: Optional[str] = None  # Kubernetes takes strings only: `value: 1` is rejected


class _Container(_K8s):
    name: str
    image: str = Field(min_length=1)
    resources: _Resources
    env: list[_EnvVar] = Field(default_factory=list)

    @field_validator("env")
    @classmethod
    def _auth_mode_left_to_auth_options(cls, v: list) -> list:
        for e in v:
            if e.name == "RAY_AUTH_MODE" and e.value != "token":
                raise ValueError(f"RAY_AUTH_MODE={e.value}: turns Ray's token authentication off on "
                                 "this node; leave the mode to spec.authOptions")
        return v


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

    @model_validator(mode="after")
    def _serve_fast_ingress(self):
        env = {e.name: e.value for e in self.template.spec.containers[0].env}
        missing = [f"{k}={v}" for k, v in SERVE_FAST_INGRESS_ENV.items() if env.get(k) != v]
        if missing:
            raise ValueError(f"template.spec.containers[0].env: {', '.join(missing)} missing: Serve "
                             "reads its ingress from the environment `ray start` runs in, so without "
                             "it on every Ray container Serve answers through its Python HTTP proxy "
                             "instead of HAProxy")
        return self


class _HeadGroupSpec(_GroupSpec):
    serviceType: Optional[str] = None
    headService: Optional[dict] = None
    enableIngress: Optional[bool] = None

    @model_validator(mode="after")
    def _head_service_stays_in_the_cluster(self):
        kinds = {"serviceType": self.serviceType,
                 "headService.spec.type": ((self.headService or {}).get("spec") or {}).get("type")}
        for field, kind in kinds.items():
            if kind not in (None, "ClusterIP"):
                raise ValueError(f"{field}: {kind} exposes the head's ports (the dashboard and Jobs "
                                 "API among them) outside the Kubernetes cluster; keep ClusterIP and "
                                 "reach it with `kubectl port-forward`")
        if self.enableIngress:
            raise ValueError("enableIngress: an Ingress exposes the dashboard and Jobs API outside the "
                             "Kubernetes cluster; reach them with `kubectl port-forward`")
        return self


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


class _AuthOptions(_K8s):
    mode: Optional[str] = None


class _RayClusterSpec(_K8s):
    rayVersion: str = Field(min_length=1)
    enableInTreeAutoscaling: bool = False
    autoscalerOptions: Optional[_AutoscalerOptions] = None
    # KubeRay >= 1.5.1: `mode: token` makes the operator create a Secret with a random token (named
    # after the RayCluster, key auth_token) and set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every
    # Ray container.
    authOptions: Optional[_AuthOptions] = None
    headGroupSpec: _HeadGroupSpec
    workerGroupSpecs: list[_WorkerGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _token_auth(self):
        mode = self.authOptions.mode if self.authOptions else None
        if mode != "token":
            state = f"mode is {mode!r}" if self.authOptions else "absent"
            raise ValueError(f"authOptions: {state}; set `authOptions: {{mode: token}}` (KubeRay >= "
                             "1.5.1 then creates a token Secret and sets RAY_AUTH_MODE=token and "
                             "RAY_AUTH_TOKEN on every Ray container): without it the dashboard and "
                             "Jobs API run whatever anyone who reaches the head service sends")
        return self

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
    parser = argparse.ArgumentParser(prog="python -m cluster.configs",
                                     description="Validate cluster YAMLs (default: every one in cluster/).")
    parser.add_argument("paths", nargs="*", help="cluster YAMLs (launcher configs or KubeRay manifests)")
    parser.add_argument("--allow-example-ami", action="store_true",
                        help=f"accept aws.yaml's example ImageId {AWS_EXAMPLE_AMI} (also "
                             f"{ALLOW_EXAMPLE_AMI_ENV}=1); without it the file fails until you set "
                             "the current id for your region")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    allow = True if args.allow_example_ami else None
    failed = 0
    for path in args.paths or cluster_yaml_paths():
        try:
            validate(path, allow_example_ami=allow)
            print(f"ok      {path}")
        except ClusterConfigError as e:
            failed += 1
            print(f"invalid {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
