"""Every cluster YAML in cluster/ passes Ray's own config validation (KubeRay: the RayCluster
structure), a malformed copy is rejected with the file, field and reason, and the YAMLs say what
the product promises: CPU and GPU worker types that autoscale, with the project installed, on an
image torch installs on, with Ray's token authentication and Serve's HAProxy ingress on every node."""

from __future__ import annotations

import copy

import pytest
import ray
import yaml

from cluster import configs
from cluster.configs import (ALLOW_EXAMPLE_AMI_ENV, AUTH_TOKEN_FILE, AWS_AMI_NAME, AWS_EXAMPLE_AMI,
                             SERVE_FAST_INGRESS_ENV, ClusterConfigError, aws_ami_lookup_command,
                             cluster_yaml_paths, load, ray_start_invocations, validate, worker_types)
from cluster.local import LocalCluster, LocalClusterError, main as local_main

NAMES = ["aws.yaml", "gcp.yaml", "kuberay.yaml", "local.yaml"]
README = configs.CLUSTER_DIR.parent / "README.md"


@pytest.fixture(autouse=True)
def _accept_the_example_ami(monkeypatch):
    # aws.yaml ships an example ImageId that the validator refuses by default (tested below, with
    # this unset); every other test checks the rest of the file.
    monkeypatch.setenv(ALLOW_EXAMPLE_AMI_ENV, "1")


def by_name(name: str) -> dict:
    return load(configs.CLUSTER_DIR / name)


def test_cluster_dir_ships_local_aws_gcp_and_kuberay_yamls():
    assert [p.name for p in cluster_yaml_paths()] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_cluster_yaml_validates(name):
    validate(configs.CLUSTER_DIR / name)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yamls_have_cpu_and_gpu_worker_types_that_autoscale_from_zero(name):
    config = validate(configs.CLUSTER_DIR / name)
    types = worker_types(config)
    gpu = [t for t, (_, _, res) in types.items() if res.get("GPU", 0) >= 1]
    cpu = [t for t, (_, _, res) in types.items() if not res.get("GPU") and res.get("CPU", 0) >= 1]
    assert gpu and cpu
    for lo, hi, _ in types.values():
        assert lo == 0 < hi <= config["max_workers"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yamls_install_cuda_torch_on_gpu_nodes_then_the_project(name):
    config = validate(configs.CLUSTER_DIR / name)
    for node_type, spec in config["available_node_types"].items():
        if node_type == config["head_node_type"]:
            commands = config["head_setup_commands"]
        else:
            commands = spec["worker_setup_commands"]
        torch_cmd = next(i for i, c in enumerate(commands) if "torch==" in c)
        project_cmd = next(i for i, c in enumerate(commands) if "ray-elastic-orchestrator" in c)
        assert torch_cmd < project_cmd, "torch first, so the project does not pull another build"
        wheel = "/whl/cu12" if spec["resources"].get("GPU") else "/whl/cpu"
        assert wheel in commands[torch_cmd] and "download.pytorch.org" in commands[torch_cmd]
    assert "~/ray-elastic-orchestrator" in config["file_mounts"]
    assert f"ray[train,tune,serve,default]=={ray.__version__}" in " ".join(config["setup_commands"])


def test_kuberay_manifest_autoscales_cpu_and_gpu_groups_on_the_pinned_ray():
    manifest = validate(configs.CLUSTER_DIR / "kuberay.yaml")
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    groups = worker_types(manifest)
    assert any("nvidia.com/gpu" in limits for _, _, limits in groups.values())
    assert any("nvidia.com/gpu" not in limits for _, _, limits in groups.values())
    for lo, hi, _ in groups.values():
        assert lo == 0 < hi
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert all("ray-elastic-orchestrator" in image for image in images)  # built by cluster/Dockerfile
    assert (configs.CLUSTER_DIR / "Dockerfile").exists()


def test_aws_yaml_pins_one_dlami_for_every_node_type_and_says_how_to_find_its_id():
    config = validate(configs.CLUSTER_DIR / "aws.yaml")
    images = {t: spec["node_config"].get("ImageId") for t, spec in config["available_node_types"].items()}
    assert set(images.values()) == {AWS_EXAMPLE_AMI}, images  # one image: the same Python everywhere
    lookup = aws_ami_lookup_command(config["provider"]["region"])
    text = (configs.CLUSTER_DIR / "aws.yaml").read_text()
    assert lookup in text and AWS_AMI_NAME in text and "EXAMPLE" in text
    assert lookup in README.read_text()


def test_aws_example_ami_is_refused_unless_allowed(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(ALLOW_EXAMPLE_AMI_ENV)
    aws = configs.CLUSTER_DIR / "aws.yaml"
    with pytest.raises(ClusterConfigError) as e:
        validate(aws)
    msg = str(e.value)
    assert msg.startswith(f"{aws}: available_node_types.head.node_config.ImageId: {AWS_EXAMPLE_AMI} "
                          "is the example id")
    assert aws_ami_lookup_command("us-west-2") in msg and "--allow-example-ami" in msg
    validate(aws, allow_example_ami=True)
    monkeypatch.setenv(ALLOW_EXAMPLE_AMI_ENV, "1")
    validate(aws)
    # A real id passes without the flag.
    monkeypatch.delenv(ALLOW_EXAMPLE_AMI_ENV)
    mine = tmp_path / "aws.yaml"
    mine.write_text(aws.read_text().replace(AWS_EXAMPLE_AMI, "ami-0123456789abcdef0"))
    validate(mine)
    # The command: fails on the shipped aws.yaml, naming the lookup, unless told otherwise.
    assert configs.main([str(aws)]) == 1
    assert "aws ec2 describe-images" in capsys.readouterr().err
    assert configs.main(["--allow-example-ami", str(aws)]) == 0


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yamls_start_every_node_with_token_auth_and_serve_ingress_and_ship_the_token(name):
    config = validate(configs.CLUSTER_DIR / name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (env, args), = [inv for c in config[key] for inv in ray_start_invocations(c)]
        assert env["RAY_AUTH_MODE"] == "token"
        assert {k: env.get(k) for k in SERVE_FAST_INGRESS_ENV} == SERVE_FAST_INGRESS_ENV
        if key.startswith("head"):
            assert "--head" in args and "--dashboard-host=0.0.0.0" in args  # only with token auth
    assert config["file_mounts"][AUTH_TOKEN_FILE] == AUTH_TOKEN_FILE
    # Logins on the nodes (the scheduler service, drivers given RAY_ADDRESS) run in token mode too.
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in config["setup_commands"])


def test_serve_ingress_flags_are_the_ones_serve_reads():
    from actors.serve import ingress
    assert SERVE_FAST_INGRESS_ENV == ingress._ENV["haproxy"]
    assert ingress.FAST_ENV == " ".join(f"{k}={v}" for k, v in SERVE_FAST_INGRESS_ENV.items())


def test_kuberay_manifest_turns_token_auth_on_keeps_the_head_inside_and_sets_serve_ingress():
    spec = validate(configs.CLUSTER_DIR / "kuberay.yaml")["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress")
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in SERVE_FAST_INGRESS_ENV} == SERVE_FAST_INGRESS_ENV
        assert "RAY_AUTH_MODE" not in env  # set by the operator from authOptions


@pytest.mark.parametrize("command, expected", [
    ("ulimit -n 65536; A=1 B=2 ray start --head --port=6379", [({"A": "1", "B": "2"}, ["--head", "--port=6379"])]),
    ("export A=1 C=3 && env B=2 ray start --address=x:6379", [({"A": "1", "B": "2", "C": "3"}, ["--address=x:6379"])]),
    ("A=1; ray start --head", [({}, ["--head"])]),  # a shell variable, not in ray start's environment
    ("ray stop", []),
    ("echo 'ray start' >> log", []),
])
def test_ray_start_invocations_finds_the_environment_that_reaches_ray_start(command, expected):
    assert ray_start_invocations(command) == expected


def test_local_yaml_is_a_fake_multinode_cluster_that_scales_down_within_a_minute():
    config = validate(configs.CLUSTER_DIR / "local.yaml")
    assert config["provider"]["type"] == "fake_multinode"
    assert config["idle_timeout_minutes"] <= 1
    (cpu_type, (lo, hi, res)), = worker_types(config).items()
    assert lo == 0 and hi >= 2 and res["CPU"] >= 1
    # The head's resources come from the YAML, so `ray start` and the autoscaler agree on them.
    assert LocalCluster().head_resources() == {"CPU": 0}


def test_local_cluster_head_starts_with_token_auth_and_serves_ingress_as_jobs_serve_would(tmp_path):
    from actors.serve.ingress import start_env
    env = LocalCluster(state_dir=str(tmp_path), address="10.0.0.1:6379").head_env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"] == "10.0.0.1:6379"
    running, flags, _ = start_env("auto")  # HAProxy where its binary runs, else direct ingress
    assert {k: env[k] for k in flags} == flags
    if running == "haproxy":
        assert {k: env[k] for k in SERVE_FAST_INGRESS_ENV} == SERVE_FAST_INGRESS_ENV


# -----------------------------------------------------------------------------------------------
# malformed copies
# -----------------------------------------------------------------------------------------------
def _break(name: str, edit) -> dict:
    config = copy.deepcopy(by_name(name))
    edit(config)
    return config


LAUNCHER_BREAKAGES = {
    "string GPU count": ("aws.yaml",
                         lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="one"),
                         "available_node_types.gpu_worker.resources.GPU: 'one' is not of type 'integer'"),
    "unknown node type field": ("gcp.yaml",
                                lambda c: c["available_node_types"]["cpu_worker"].update(min_worker=1),
                                "available_node_types.cpu_worker: Additional properties are not allowed "
                                "('min_worker' was unexpected)"),
    "head type not declared": ("aws.yaml", lambda c: c.update(head_node_type="nope"),
                               "`head_node_type` must be one of `available_node_types`"),
    "min workers over the cap": ("gcp.yaml", lambda c: c.update(max_workers=1)
                                 or c["available_node_types"]["cpu_worker"].update(min_workers=2),
                                 "max_workers` is smaller than the sum of `min_workers`"),
    "no provider": ("aws.yaml", lambda c: c.pop("provider"), "provider.type: required"),
    "fake head renamed": ("local.yaml",
                          lambda c: (c["available_node_types"].update(
                              head=c["available_node_types"].pop("ray.head.default")),
                              c.update(head_node_type="head")),
                          "head_node_type: the fake_multinode provider names its head 'ray.head.default'"),
    "fake config missing a field Ray would not fill": (
        "local.yaml", lambda c: c.pop("cluster_synced_files"),
        "cluster_synced_files: required (Ray fills no defaults"),
    "head started without token auth": (
        "aws.yaml", lambda c: c.update(head_start_ray_commands=[
            x.replace("RAY_AUTH_MODE=token ", "") for x in c["head_start_ray_commands"]]),
        "head_start_ray_commands.1: `ray start` runs without RAY_AUTH_MODE=token in its environment "
        "with --dashboard-host=0.0.0.0"),
    "token mode set as a shell variable only": (
        "gcp.yaml", lambda c: c.update(head_start_ray_commands=[
            x.replace("RAY_AUTH_MODE=token ", "RAY_AUTH_MODE=token; ") for x in c["head_start_ray_commands"]]),
        "head_start_ray_commands.1: `ray start` runs without RAY_AUTH_MODE=token"),
    "workers with token auth disabled": (
        "gcp.yaml", lambda c: c.update(worker_start_ray_commands=[
            x.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled") for x in c["worker_start_ray_commands"]]),
        "worker_start_ray_commands.1: RAY_AUTH_MODE=disabled turns Ray's token authentication off"),
    "a setup command disabling token auth": (
        "aws.yaml", lambda c: c["setup_commands"].append("echo 'export RAY_AUTH_MODE=disabled' >> ~/.bashrc"),
        "setup_commands.5: RAY_AUTH_MODE=disabled turns Ray's token authentication off"),
    "no token sent to the nodes": (
        "aws.yaml", lambda c: c["file_mounts"].pop("~/.ray/auth_token"),
        "file_mounts: no Ray auth token reaches the nodes (head_start_ray_commands.1 starts Ray with "
        "RAY_AUTH_MODE=token, which refuses to start without one): add `~/.ray/auth_token: ~/.ray/auth_token`"),
    "workers without Serve's HAProxy flag": (
        "gcp.yaml", lambda c: c.update(worker_start_ray_commands=[
            x.replace("RAY_SERVE_ENABLE_HA_PROXY=1 ", "") for x in c["worker_start_ray_commands"]]),
        "worker_start_ray_commands.1: `ray start` runs without RAY_SERVE_ENABLE_HA_PROXY=1 in its environment"),
    "AWS node type on Ray's default AMI": (
        "aws.yaml", lambda c: c["available_node_types"]["cpu_worker"]["node_config"].pop("ImageId"),
        "available_node_types.cpu_worker.node_config.ImageId: required: without it Ray launches its "
        "default AMI (Ubuntu 18.04, glibc 2.27)"),
}


@pytest.mark.parametrize("case", sorted(LAUNCHER_BREAKAGES))
def test_malformed_launcher_yaml_is_rejected_naming_file_field_and_reason(case, tmp_path):
    name, edit, expected = LAUNCHER_BREAKAGES[case]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(_break(name, edit)))
    with pytest.raises(ClusterConfigError) as e:
        validate(path)
    assert str(e.value).startswith(f"{path}: ")
    assert expected in str(e.value)


def _gpu_group(c):
    return next(g for g in c["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")


def _ray_container(group):
    return group["template"]["spec"]["containers"][0]


KUBERAY_BREAKAGES = {
    "old api version": (lambda c: c.update(apiVersion="ray.io/v1alpha1"),
                        "apiVersion: Input should be 'ray.io/v1'"),
    "not a RayCluster": (lambda c: c.update(kind="RayJob"), "kind: Input should be 'RayCluster'"),
    "no head group": (lambda c: c["spec"].pop("headGroupSpec"), "spec.headGroupSpec: Field required"),
    "integer rayStartParams": (lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                               "spec.headGroupSpec.rayStartParams.num-cpus: Input should be a valid string"),
    "replica bounds inverted": (lambda c: _gpu_group(c).update(minReplicas=5, maxReplicas=2),
                                "spec.workerGroupSpecs.1: Value error, minReplicas (5) > maxReplicas (2)"),
    "bad memory quantity": (lambda c: _ray_container(_gpu_group(c))["resources"]["limits"]
                            .update(memory="48 gigs"),
                            "spec.workerGroupSpecs.1.template.spec.containers.0.resources.limits: "
                            "Value error, memory: '48 gigs' is not a Kubernetes quantity"),
    "ray container without a size": (lambda c: _ray_container(_gpu_group(c)).update(
                                         resources={"limits": {"nvidia.com/gpu": 1}}),
                                     "the Ray container needs limits for cpu, memory"),
    "no image": (lambda c: _ray_container(_gpu_group(c)).pop("image"),
                 "spec.workerGroupSpecs.1.template.spec.containers.0.image: Field required"),
    "duplicate group": (lambda c: c["spec"]["workerGroupSpecs"].append(copy.deepcopy(_gpu_group(c))),
                        "duplicate groupName gpu"),
    "unknown upscaling mode": (lambda c: c["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
                               "spec.autoscalerOptions.upscalingMode: Input should be 'Default', "
                               "'Aggressive' or 'Conservative'"),
    "negative idle timeout": (lambda c: c["spec"]["autoscalerOptions"].update(idleTimeoutSeconds=-1),
                              "spec.autoscalerOptions.idleTimeoutSeconds: Input should be greater than "
                              "or equal to 0"),
    "no token auth": (lambda c: c["spec"].pop("authOptions"),
                      "spec: Value error, authOptions: absent; set `authOptions: {mode: token}`"),
    "token auth disabled": (lambda c: c["spec"]["authOptions"].update(mode="disabled"),
                            "spec: Value error, authOptions: mode is 'disabled'"),
    "a container turning token auth off": (
        lambda c: _ray_container(c["spec"]["headGroupSpec"])["env"].append(
            {"name": "RAY_AUTH_MODE", "value": "disabled"}),
        "spec.headGroupSpec.template.spec.containers.0.env: Value error, RAY_AUTH_MODE=disabled: turns "
        "Ray's token authentication off"),
    "head service as a load balancer": (
        lambda c: c["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "spec.headGroupSpec: Value error, serviceType: LoadBalancer exposes the head's ports"),
    "head service type in headService": (
        lambda c: c["spec"]["headGroupSpec"].update(headService={"spec": {"type": "NodePort"}}),
        "spec.headGroupSpec: Value error, headService.spec.type: NodePort exposes the head's ports"),
    "ingress to the dashboard": (lambda c: c["spec"]["headGroupSpec"].update(enableIngress=True),
                                 "spec.headGroupSpec: Value error, enableIngress: an Ingress exposes"),
    "gpu workers without Serve's ingress flags": (
        lambda c: _ray_container(_gpu_group(c)).pop("env"),
        "spec.workerGroupSpecs.1: Value error, template.spec.containers[0].env: "
        "RAY_SERVE_ENABLE_HA_PROXY=1, RAY_SERVE_ENABLE_DIRECT_INGRESS=1 missing"),
    "integer env value": (lambda c: _ray_container(_gpu_group(c))["env"][0].update(value=1),
                          "spec.workerGroupSpecs.1.template.spec.containers.0.env.0.value: Input should "
                          "be a valid string"),
}


@pytest.mark.parametrize("case", sorted(KUBERAY_BREAKAGES))
def test_malformed_kuberay_manifest_is_rejected_naming_field_and_reason(case):
    edit, expected = KUBERAY_BREAKAGES[case]
    with pytest.raises(ClusterConfigError) as e:
        validate(_break("kuberay.yaml", edit), name="kuberay.yaml")
    assert str(e.value).startswith("kuberay.yaml: ")
    assert expected in str(e.value)


def test_non_mapping_yaml_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ClusterConfigError, match="expected a YAML mapping"):
        validate(path)


def test_validate_command_checks_every_shipped_yaml_and_fails_on_a_bad_one(tmp_path, capsys, monkeypatch):
    assert configs.main([]) == 0  # with REO_ALLOW_EXAMPLE_AMI=1 (the fixture)
    assert capsys.readouterr().out.count("ok ") == len(NAMES)
    monkeypatch.delenv(ALLOW_EXAMPLE_AMI_ENV)
    assert configs.main(["--allow-example-ami"]) == 0
    assert capsys.readouterr().out.count("ok ") == len(NAMES)
    assert configs.main([]) == 1  # aws.yaml's example ImageId, until it is replaced
    out, err = capsys.readouterr()
    assert out.count("ok ") == len(NAMES) - 1 and "aws.yaml: available_node_types.head" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_break("aws.yaml", lambda c: c.update(max_workers="ten"))))
    assert configs.main([str(bad), str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: max_workers: 'ten' is not of type 'integer'" in err
    assert "missing.yaml: cannot read" in err


def test_local_cluster_commands_without_a_running_cluster(tmp_path, capsys):
    assert local_main(["down", "--state-dir", str(tmp_path)]) == 0
    assert "no local cluster state" in capsys.readouterr().err
    with pytest.raises(LocalClusterError, match="python -m cluster.local up"):
        LocalCluster.from_state(tmp_path)
    assert local_main(["status", "--state-dir", str(tmp_path)]) == 1


def test_local_cluster_refuses_a_port_in_use(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        cluster = LocalCluster(state_dir=str(tmp_path), port=taken.getsockname()[1])
        with pytest.raises(LocalClusterError, match="--port N"):
            cluster.start()


# -----------------------------------------------------------------------------------------------
# the scheduler service's supervisor files
# -----------------------------------------------------------------------------------------------
def _scheduler_args(argv: list[str]):
    """``argv`` (``orchestrator scheduler ...``) parsed by the real CLI's parser."""
    import os

    from orchestrator.cli import build_parser
    assert os.path.basename(argv[0]) == "orchestrator" and argv[1] == "scheduler", argv
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_scheduler"
    return args


def _unit(path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (keys like Environment= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, eq, value = line.partition("=")
        assert current is not None and eq, f"{path}: not a unit line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_systemd_unit_restarts_the_scheduler_command_with_its_store_and_ray_settings():
    import shlex
    assert set(configs.SERVICE_FILES) == {p.name for p in configs.CLUSTER_DIR.glob("orchestrator-scheduler.*")}
    unit = _unit(configs.CLUSTER_DIR / "orchestrator-scheduler.service")
    service = unit["Service"]
    assert service["Restart"] == ["always"] and int(service["RestartSec"][0]) > 0
    env = dict(e.partition("=")[::2] for e in service["Environment"])
    assert {"ORCHESTRATOR_STORE", "RAY_ADDRESS"} <= set(env) and env["RAY_AUTH_MODE"] == "token"
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/")  # systemd wants an absolute path
    args = _scheduler_args(argv)
    assert args.health_file.startswith("/run/" + service["RuntimeDirectory"][0] + "/")
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_kubernetes_deployment_runs_one_scheduler_with_secrets_and_a_liveness_probe():
    import shlex
    d = load(configs.CLUSTER_DIR / "orchestrator-scheduler.k8s.yaml")
    assert (d["apiVersion"], d["kind"]) == ("apps/v1", "Deployment")
    spec = d["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["restartPolicy"] == "Always"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    for name in ("ORCHESTRATOR_STORE", "RAY_AUTH_TOKEN"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"], name
    assert env["RAY_AUTH_MODE"]["value"] == "token" and env["RAY_ADDRESS"]["value"]
    # the same image as the RayCluster's nodes, so the same Ray and the same project
    images = {g["template"]["spec"]["containers"][0]["image"] for g in
              [by_name("kuberay.yaml")["spec"]["headGroupSpec"],
               *by_name("kuberay.yaml")["spec"]["workerGroupSpecs"]]}
    assert c["image"] in images
    assert env["RAY_ADDRESS"]["value"] == f"{by_name('kuberay.yaml')['metadata']['name']}-head-svc:6379"
    (script,) = c["args"]
    steps = [shlex.split(s) for s in script.split("&&")]
    assert steps[0][:2] == ["ray", "start"] and "--num-cpus=0" in steps[0]  # a node for the driver
    assert steps[-1][0] == "exec"
    args = _scheduler_args(steps[-1][1:])
    probe = " ".join(c["livenessProbe"]["exec"]["command"])
    assert args.health_file in probe and "raylet" in probe
