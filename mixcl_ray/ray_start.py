"""Starting or joining Ray the way every mixcl_ray process does (``init_ray``)."""

from __future__ import annotations

import os

# Ray Train's controller polls its workers every 2 s by default, so a fit notices its start and
# its end up to 2 s late; at 0.5 s a short fit ends seconds sooner, for one status call per
# worker every 0.5 s.
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
# Ray Train starts one more actor process per fit, a watcher that polls for draining nodes and
# hands the news to ``ray.train.get_preemption_info()``, which no mixcl_ray loop reads (a lost
# node restarts the group from its last checkpoint either way); each actor process costs CPU
# time to start while the fit's workers start.
PREEMPTION_ENV, PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"
# what every process of the job gets unless this process's environment sets it
JOB_ENV_DEFAULTS = {TRAIN_POLL_ENV: TRAIN_POLL_S, PREEMPTION_ENV: PREEMPTION_WATCHER}
# A raylet keeps as many idle worker processes as its node has CPUs and kills any more after 1 s
# idle. The feed's tasks ask half a CPU each, so twice as many task processes run as there are
# CPUs, and each gap of a second (an epoch's end, a validation, a slow consumer) killed half of
# them; the next blocks then waited while new processes started and imported numpy, pyarrow and
# Ray Data (an epoch of the feed took up to 5x its usual time; docs/training.md). A node started
# by ``init_ray`` gets it from this variable; a cluster's ``ray start`` needs it in its
# environment (the deploy recipes set it).
IDLE_WORKER_ENV, IDLE_WORKER_MS = "RAY_idle_worker_killing_time_threshold_ms", "300000"
# ray.init(runtime_env=RAY_RUNTIME_ENV): every worker process of the job runs ``setup_worker``
RAY_RUNTIME_ENV = {"worker_process_setup_hook": "mixcl_ray.ray_start.setup_worker"}


def setup_worker() -> None:
    """What every worker process of a mixcl_ray job does first: Ray Data re-reads its limits
    often (``mixcl_ray.feed.refresh_limits_often``) and MONAI loads without the packages it
    would load for nothing (``mixcl_ray.lean_monai``)."""
    from mixcl_ray.feed import refresh_limits_often
    from mixcl_ray.lean_monai import hide_from_monai

    refresh_limits_often()
    hide_from_monai()


def init_ray(address: str | None = None, **ray_init) -> None:
    """Start (or join) Ray as every mixcl_ray process does: quiet logs, and for every process
    of the job (on every node) the setup hook (``setup_worker``), Ray Train's 0.5 s poll and no
    preemption watcher (``JOB_ENV_DEFAULTS``; a value set in this process's environment wins); a
    node it starts keeps idle worker processes for minutes, not 1 s (``IDLE_WORKER_ENV``).
    ``ray_init``: more ``ray.init`` arguments (``num_cpus``, ``include_dashboard``, ...),
    overriding those."""
    import logging

    import ray

    from mixcl_ray.feed import refresh_limits_often

    if not ray.is_initialized():
        os.environ.setdefault(IDLE_WORKER_ENV, IDLE_WORKER_MS)  # read by the raylet it starts
        runtime_env = {
            **RAY_RUNTIME_ENV,
            "env_vars": {k: os.environ.get(k, v) for k, v in JOB_ENV_DEFAULTS.items()},
        }
        options = dict(logging_level="WARNING", log_to_driver=False, runtime_env=runtime_env)
        ray.init(address=address, **{**options, **ray_init})
    refresh_limits_often()  # datasets iterated in this process execute here
    from ray.data import DataContext

    context = DataContext.get_current()  # the stages report their own progress per epoch
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
