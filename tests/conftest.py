import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def start_test_ray():
    from mixcl_ray.pretrain import init_ray

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: socket paths < 107 chars
    init_ray(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)  # as the product starts it


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_paused():
    """No Ray instance of the test session while a module runs commands that start their own:
    with two local instances on one machine, Ray Train's placement-group cleaner cannot tell
    which one to ask ("Found multiple active Ray instances") and a stopped trial never frees
    its CPUs. The session's instance comes back afterwards."""
    import ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    yield
    if was_running:
        start_test_ray()


@pytest.fixture(scope="session")
def synthetic_benchmark(tmp_path_factory) -> Path:
    """The built-in benchmark, a few cases per source, written once per session."""
    from data_prep.synthetic import generate

    return generate(
        tmp_path_factory.mktemp("bench") / "synthetic", seed=3, max_cases=10, progress=False
    )


@pytest.fixture(scope="session")
def prepared_benchmark(ray_session, synthetic_benchmark, tmp_path_factory) -> Path:
    from data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare([synthetic_benchmark], out, progress=False)
    return out


@pytest.fixture(scope="session")
def s3_env():
    """A local S3-compatible server (moto's) with one bucket, for the whole session; yields the
    environment a client needs."""
    pytest.importorskip("moto", reason="moto[server] is part of the test extra")
    from tests.servers import start_s3_server, stop_server

    proc, env = start_s3_server()
    yield env
    stop_server(proc)


@pytest.fixture
def s3(s3_env, monkeypatch):
    """The S3 server's environment in this test's process (and the commands it starts)."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return s3_env
