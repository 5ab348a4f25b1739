import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def start_test_ray():
    from mixcl_ray.ray_start import init_ray

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


_PAUSED = []  # holds True while the session's instance is stopped for ``ray_paused`` tests


@pytest.fixture(scope="module")
def ray_paused():
    """No Ray instance of the test session while a module runs commands that start their own:
    with two local instances on one machine, Ray Train's placement-group cleaner cannot tell
    which one to ask ("Found multiple active Ray instances") and a stopped trial never frees
    its CPUs. The session's instance comes back before the next test that needs it
    (``pytest_runtest_setup``)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
        _PAUSED.append(True)
    yield


# fixtures that start Ray or a server, or write a corpus: a test that uses one is in the slow tier
SLOW_FIXTURES = {
    "ray_session",
    "ray_paused",
    "prepared_benchmark",
    "synthetic_benchmark",
    "scanner_corpus",
    "mlflow_server",
    "s3_env",
}


def pytest_collection_modifyitems(items):
    """Tests that use Ray or a server are marked ``slow`` (``-m "not slow"`` is the fast tier).
    Tests that pause the session's Ray instance run last (otherwise in their usual order): the
    instance then stops once, not once per such module and back again after it (each start
    costs about 5 s and a dozen processes)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: "ray_paused" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _fast_tests_leave_ray_alone(request):
    """A test outside the slow tier that starts Ray fails: the fast tier runs without a cluster."""

    def running():
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    before = running()
    yield
    if not before and running() and not request.node.get_closest_marker("slow"):
        sys.modules["ray"].shutdown()
        pytest.fail("this test started Ray: mark it slow (pytest.mark.slow) or use ray_session")


def pytest_runtest_setup(item):
    fixtures = getattr(item, "fixturenames", ())
    if _PAUSED and "ray_paused" not in fixtures and "ray_session" in fixtures:
        _PAUSED.clear()
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
