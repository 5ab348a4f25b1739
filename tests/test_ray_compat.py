"""The Ray internals mixcl_ray depends on where Ray has no public API: one test that fails
loudly when a Ray release changes them (pyproject.toml pins the tested minor version)."""

import ray


def test_the_ray_internals_the_feed_reads_are_there():
    from ray.data._internal.execution.resource_manager import ResourceManager
    from ray.data.context import DataContext

    from mixcl_ray.feed import epoch_index

    # the epoch of each execution of a dataset (mixcl_ray.feed.epoch_index)
    assert isinstance(DataContext.get_current()._execution_idx, int)
    assert epoch_index() == DataContext.get_current()._execution_idx
    # the cached resource limits that mixcl_ray.feed.refresh_limits_often shortens
    assert isinstance(ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S, int | float)


def test_ray_is_the_pinned_minor_version():
    from pathlib import Path

    import tomllib

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (spec,) = [d for d in tomllib.loads(text)["project"]["dependencies"] if d.startswith("ray[")]
    major, minor = ray.__version__.split(".")[:2]
    assert f">={major}.{minor}" in spec and f"<{major}.{int(minor) + 1}" in spec, spec
