"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: one head and two worker
nodes, each with its own raylet): pre-training with its two workers on different nodes, and one
of those nodes killed mid-run. The run must finish from its last checkpoint, with no epoch lost
beyond it."""

import time

import psutil
import pytest
import ray

from mixcl_ray.checkpoints import load_checkpoint_state
from mixcl_ray.config import load_config
from mixcl_ray.pretrain import run_pretraining
from mixcl_ray.ray_start import init_ray
from tests.test_faults import run_in_thread, train_worker_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.usefixtures("ray_paused")]


@pytest.fixture
def cluster(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    init_ray(cluster.address)  # joined as the product joins a cluster (--address)
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def _raylet_pid(proc: psutil.Process) -> int | None:
    """The raylet a worker process belongs to (its nearest raylet ancestor)."""
    for parent in proc.parents():
        if "raylet" in parent.name():
            return parent.pid
    return None


def _node_raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def test_node_killed_mid_run_resumes_from_the_last_checkpoint(
    cluster, prepared_benchmark, tmp_path
):
    cluster, nodes = cluster
    config = load_config(
        "pretrain",
        overrides={
            "optim": {"epochs": 2},
            # streamed: every epoch reads the shards again, so the epochs after the loss need
            # read tasks that fit beside the workers on the nodes left (a read that asked for a
            # whole CPU waited forever there)
            "patches": {"patches_per_case": 3, "batch_size": 2, "cache_cases": False},
            "scaling": {
                "workers": 2,
                "cpus_per_worker": 0.5,
                "max_failures": 2,
                "placement_strategy": "STRICT_SPREAD",  # never two workers on one node
            },
        },
    )
    run = tmp_path / "multinode"
    thread, box = run_in_thread(
        lambda: run_pretraining(prepared_benchmark, tmp_path, config, name="multinode")
    )
    killed, hosts = None, set()
    deadline = time.time() + 600
    while time.time() < deadline and killed is None and thread.is_alive():
        workers = train_worker_processes()
        hosts = {_raylet_pid(w) for w in workers}
        in_epoch_1 = (run / "epoch_0000").exists() and not (run / "epoch_0001").exists()
        if in_epoch_1 and len(workers) == 2:
            time.sleep(3)
            victim = next(n for n in nodes if _node_raylet_pid(n) in hosts)
            assert not (run / "epoch_0001").exists()
            cluster.remove_node(victim, allow_graceful=False)  # SIGKILL of the node's processes
            killed = victim
        time.sleep(0.5)
    assert killed is not None, "the run never reached epoch 1 with both workers up"
    assert len(hosts) == 2  # the two workers ran on two different nodes (raylets)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish after the node was lost"
    if "error" in box:
        raise box["error"]
    result = box["result"]
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1]
    steps = result.history[0]["step"]
    assert [h["step"] for h in result.history] == [steps, 2 * steps]
    assert load_checkpoint_state(result.checkpoint)["epoch"] == 1
