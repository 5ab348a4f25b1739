import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: socket paths < 107 chars
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


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
