"""The cluster recipes in deploy/: no cloud is reachable here, so each file is parsed, checked
for the keys its tool needs, and every command it runs is checked against the package (the
module exists and its parser accepts the arguments; the files it names exist). The MLflow
server recipe is started for real and must listen on 127.0.0.1 only."""

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from tests.doc_commands import check_module_command, commands_in
from tests.servers import MLFLOW_RECIPE, free_port, mlflow_recipe_env, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LAUNCHER = ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_cluster_launcher_recipes(name):
    text = (DEPLOY / name).read_text()
    config = yaml.safe_load(text)
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
    ):
        assert key in config, key
    assert config["provider"]["type"] == name.removesuffix(".yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    gpu = [
        t
        for t in workers
        if t["node_config"].get("InstanceType", "").startswith(("g", "p"))
        or t["node_config"].get("guestAccelerators")
    ]
    assert gpu, "no GPU worker type"
    assert all(t["max_workers"] <= config["max_workers"] for t in workers)
    setup = "\n".join(config["setup_commands"])
    # the same Ray on every node as the driver's, this checkout installed, shared storage mounted
    assert f"ray[default,train,tune]=={ray.__version__}" in setup
    assert "torch==2.13.0" in setup
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert mounted and f"pip install -q -e ~/{Path(mounted[0]).name}" in setup
    assert "/shared" in setup
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    commands = commands_in(text)
    assert any("mixcl_ray.tune" in c for c in commands)
    for command in commands:
        check_module_command(command)


def test_kuberay_recipe():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text()))
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    check_module_command(spec["entrypoint"])
    assert "--storage /shared" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    assert any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    for pod in pods:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert claims == {claim["metadata"]["name"]}
        for container in pod["containers"]:
            assert {m["mountPath"] for m in container["volumeMounts"]} == {"/shared"}
            for env in container["env"]:  # tracking credentials only from a Secret
                assert "value" not in env and "secretKeyRef" in env["valueFrom"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile and "pip install" in dockerfile


def test_cluster_page_commands_run_in_the_package():
    section = (ROOT / "docs" / "cluster.md").read_text()
    commands = commands_in(section)
    assert any("tune_spaces/spleen.yaml" in c for c in commands)
    for command in commands:
        check_module_command(command)
    for recipe in re.findall(r"deploy/[\w.\-/]+", section):
        assert (ROOT / recipe).exists(), recipe


@pytest.mark.slow
def test_mlflow_server_recipe_binds_to_localhost(tmp_path):
    port = free_port()
    env = mlflow_recipe_env(tmp_path, port)
    refused = subprocess.run(
        ["bash", str(MLFLOW_RECIPE)],
        env=dict(env, MLFLOW_BACKEND_URI="postgresql://mlflow:hunter2@db/mlflow"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "PGPASSWORD" in refused.stderr
    proc = subprocess.Popen(
        ["bash", str(MLFLOW_RECIPE)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, "the recipe's server")
        tree = psutil.Process(proc.pid)
        listening = [
            c.laddr
            for p in [tree, *tree.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        # and without MLflow's job runner (its consumer processes) unless asked for
        commands = [" ".join(p.cmdline()) for p in tree.children(recursive=True)]
        assert commands and not [c for c in commands if "huey" in c], commands
        assert (tmp_path / "mlflow.db").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
