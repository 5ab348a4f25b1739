"""The cluster recipes in deploy/: no cloud is reachable here, so each file is validated against
its tool's own schema (the launcher YAMLs against the ray-schema.json that Ray ships, the KubeRay
manifest against KubeRay's CRDs vendored under tests/schemas/), checked for what it must do
(drivers, token authentication, the shared volume), and every command it runs is checked against
the package (the module exists and its parser accepts the arguments; the files it names exist).
The MLflow server recipe is started for real and must listen on 127.0.0.1 only; a Ray head with
token authentication is started for real and refuses a client without the token."""

import copy
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from tests.doc_commands import check_module_command, commands_in
from tests.servers import (
    MLFLOW_PASSWORD,
    MLFLOW_RECIPE,
    MLFLOW_USER,
    free_port,
    mlflow_recipe_env,
    stop_server,
    wait_for_http,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY_CRDS = ROOT / "tests" / "schemas" / "kuberay-v1.7.0"
RECIPE_PARAMETERS = {"IMAGE": "registry.example.org/mixcl-ray:latest", "STORAGE_CLASS": "efs-sc"}


def launcher_errors(config: dict) -> list[str]:
    """What Ray's shipped autoscaler schema finds wrong with a cluster launcher config."""
    import jsonschema

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]


def strict(schema):
    """A CRD's structural schema with unknown fields refused (as `kubectl apply` with strict
    field validation does) wherever it lists its fields and keeps no unknown ones."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_errors(document: dict, crd_file: str) -> list[str]:
    """What KubeRay's CRD (its served version of the document's apiVersion) finds wrong."""
    import jsonschema

    text = gzip.decompress((KUBERAY_CRDS / crd_file).read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB
    assert crd["spec"]["names"]["kind"] == document["kind"]
    version = document["apiVersion"].split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def kuberay_documents() -> list[dict]:
    """deploy/kuberay.yaml with its parameters filled in, as its envsubst command does; no
    other placeholder is left outside its comments."""
    text = (DEPLOY / "kuberay.yaml").read_text()
    assert f"envsubst '{' '.join('$' + k for k in RECIPE_PARAMETERS)}'" in text
    for name, value in RECIPE_PARAMETERS.items():
        text = text.replace("${" + name + "}", value)
    body = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "$" not in body, [line for line in body.splitlines() if "$" in line]
    return list(yaml.safe_load_all(text))


@pytest.mark.parametrize("name", LAUNCHER)
def test_cluster_launcher_recipes_follow_rays_schema(name):
    config = yaml.safe_load((DEPLOY / name).read_text())
    assert launcher_errors(config) == []
    broken = copy.deepcopy(config)  # the check can fail: a misspelt key, a wrong type
    broken["idle_timeout_minute"] = 10
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    assert len(launcher_errors(broken)) == 2


def test_kuberay_recipe_follows_the_kuberay_crds():
    job = next(d for d in kuberay_documents() if d["kind"] == "RayJob")
    assert crd_errors(job, "ray.io_rayjobs.yaml.gz") == []
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "mixcl"},
        "spec": job["spec"]["rayClusterSpec"],
    }
    assert crd_errors(cluster, "ray.io_rayclusters.yaml.gz") == []
    broken = copy.deepcopy(job)  # the check can fail: a misspelt field, a wrong enum value
    broken["spec"]["rayClusterSpec"]["enableInTreeAutoscalng"] = True
    broken["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "on"
    assert len(crd_errors(broken, "ray.io_rayjobs.yaml.gz")) == 2


def test_the_gcs_fault_tolerance_of_the_cluster_page_fits_the_kuberay_recipe():
    """docs/cluster.md's ``gcsFaultToleranceOptions``, added to the recipe's cluster, is what
    KubeRay's RayJob CRD accepts, its Redis password from a Secret."""
    page = (ROOT / "docs" / "cluster.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", page, re.S) if "gcsFault" in b]
    options = yaml.safe_load(textwrap.dedent(block))
    assert "secretKeyRef" in options["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
    job = next(d for d in kuberay_documents() if d["kind"] == "RayJob")
    job["spec"]["rayClusterSpec"].update(options)
    assert crd_errors(job, "ray.io_rayjobs.yaml.gz") == []
    options["gcsFaultToleranceOptions"]["redisPasword"] = "plain"  # the check can fail
    assert len(crd_errors(job, "ray.io_rayjobs.yaml.gz")) == 1


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
    # token authentication on every node, one token for the whole cluster
    starts = [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]
    for command in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command and "RAY_idle_worker_killing" in command
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    # GPU workers on an image with the NVIDIA driver, and a node without one fails loudly
    workers_start = " ".join(config["worker_start_ray_commands"])
    assert workers_start.index("nvidia-smi") < workers_start.index("ray start")
    for node in gpu:
        image = json.dumps(node["node_config"])
        assert "DLAMI" in image or "deeplearning" in image or "nvidia" in image, image
    commands = commands_in(text)
    assert any("mixcl_ray.tune" in c for c in commands)
    for command in commands:
        check_module_command(command)


def test_kuberay_recipe():
    docs = kuberay_documents()
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert claim["spec"]["storageClassName"] == RECIPE_PARAMETERS["STORAGE_CLASS"]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    check_module_command(spec["entrypoint"])
    assert "--storage /shared" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token", "secretName": "mixcl-ray-token"}
    assert cluster["enableInTreeAutoscaling"] is True  # else min/maxReplicas do nothing
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # the head service: the RayJob's cluster has a generated name, read from its status
    text = (DEPLOY / "kuberay.yaml").read_text()
    assert "{.status.rayClusterName}" in text and "svc/$CLUSTER-head-svc" in text
    assert "http://" not in text  # no tracking credentials over plain http
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
                if env["name"].startswith("MLFLOW_"):
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


def assert_basic_auth_and_allowed_hosts(url: str, root: Path) -> None:
    """The recipe's server answers the API only to its users, and only under the Host names it
    was given; its secrets are files only their owner reads."""
    import base64
    import urllib.error
    import urllib.request

    def status(user=None, password=None, host=None) -> int:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if host:
            request.add_header("Host", host)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status() == 401
    assert status(MLFLOW_USER, "wrong") == 401
    assert status(MLFLOW_USER, MLFLOW_PASSWORD) == 200
    assert status(MLFLOW_USER, MLFLOW_PASSWORD, host="mlflow.attacker.example") in (400, 403)
    for secret in (root / "flask_secret_key", root / "basic_auth.ini"):
        assert secret.stat().st_mode & 0o077 == 0, secret


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
        assert_basic_auth_and_allowed_hosts(f"http://127.0.0.1:{port}", tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_paused")
def test_a_token_authenticated_head_refuses_a_client_without_its_token(tmp_path):
    """What every recipe turns on: a Ray head started with RAY_AUTH_MODE=token and the
    cluster's token file. Its job API refuses a request without the token and a `ray job
    submit` with another token; `ray job submit` with the token runs the job."""
    import secrets
    import tempfile
    import urllib.error
    import urllib.request

    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    wrong = tmp_path / "other_token"
    wrong.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    dashboard = free_port()
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=1",
            f"--temp-dir={tempfile.mkdtemp(prefix='rt', dir='/tmp')}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        bearer = {"Authorization": f"Bearer {token.read_text()}"}
        deadline = time.time() + 120
        while True:  # the job API is up once it answers a request that carries the token
            try:
                request = urllib.request.Request(f"{address}/api/jobs/", headers=bearer)
                if urllib.request.urlopen(request, timeout=2).status == 200:
                    break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the head did not start"
                time.sleep(1)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)

        def submit(token_file: Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                [
                    ray_cli,
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--",
                    "python",
                    "-c",
                    "print('the job ran')",
                ],
                env=dict(env, RAY_AUTH_TOKEN_PATH=str(token_file)),
                capture_output=True,
                text=True,
                timeout=180,
            )

        other = submit(wrong)
        assert other.returncode != 0 and "the job ran" not in other.stdout
        ran = submit(token)
        assert ran.returncode == 0 and "the job ran" in ran.stdout, ran.stdout + ran.stderr
    finally:
        stop_server(head)
