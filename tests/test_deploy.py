"""deploy/ stays true to the code: entrypoints exist, import paths resolve, the Serve config
validates with Ray's own schema, and resources requested match what the jobs ask for."""

from __future__ import annotations

import copy
import importlib
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def resolve(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def gpu_workers(cluster_spec: dict) -> tuple[int, int]:
    """(max GPU pods, GPUs per pod) of the spec's GPU worker group."""
    (group,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    container = group["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert int(group["rayStartParams"]["num-gpus"]) == gpus
    return int(group["maxReplicas"]), gpus


def parse_entrypoint(entrypoint: str) -> tuple[Path, dict[str, str]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python"
    script, args = REPO / argv[1], {}
    i = 2
    while i < len(argv):
        flag = argv[i]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args[flag] = argv[i + 1]
            i += 2
        else:
            args[flag] = "true"
            i += 1
    return script, args


def test_serve_config_validates_and_resolves():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        assert callable(resolve(app["import_path"]))


def test_rayservice_embeds_serve_yaml_with_gpu_replicas():
    from ray.serve.schema import ServeDeploySchema

    service = load("rayservice.yaml")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    expected = copy.deepcopy(yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text()))
    for deployment in expected["applications"][0]["deployments"]:
        deployment["ray_actor_options"]["num_gpus"] = 1
    assert embedded == expected
    max_pods, gpus = gpu_workers(service["spec"]["rayClusterConfig"])
    (deployment,) = embedded["applications"][0]["deployments"]
    replicas = deployment["autoscaling_config"]["max_replicas"]
    assert replicas * deployment["ray_actor_options"]["num_gpus"] <= max_pods * gpus


def test_rayservice_pods_run_the_haproxy_ingress():
    """Serve reads its ingress from each process's environment, so every pod must set it."""
    from segray.serve.ingress import HAPROXY_ENV

    cluster = load("rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert env.items() >= HAPROXY_ENV.items(), container["name"]


def test_rayjobs_entrypoints_exist_parse_and_fit_the_cluster():
    from segray.cli import cli

    for name, command in (("rayjob-train.yaml", "train"), ("rayjob-predict.yaml", "predict")):
        job = load(name)
        script, args = parse_entrypoint(job["spec"]["entrypoint"])
        assert script.exists(), script
        # the options parse with the click command the script runs (unknown flags raise)
        cli.commands[command].make_context(command, shlex.split(job["spec"]["entrypoint"])[2:])
        max_pods, gpus = gpu_workers(job["spec"]["rayClusterSpec"])
        if command == "train":
            wanted = int(args["--workers"]) * (1 if "--gpu" in args else 0)
        else:
            wanted = int(args["--concurrency"]) * float(args.get("--gpus-per-actor", 0))
        assert 0 < wanted <= max_pods * gpus, (name, wanted, max_pods * gpus)


def test_raycluster_has_cpu_head_and_gpu_group():
    cluster = load("raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_workers(cluster["spec"])[1] >= 1
