"""MLflow tracking of a standalone ``pretrain`` or ``finetune``: one run per command, with the
param and metric names of a sweep's runs, in the local store under ``--storage``
(``<storage>/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` names another.

    with StandaloneRun("finetune", storage, "mixcl_ray-finetune", name, params) as run:
        result = run_finetuning(..., callbacks=run.callbacks)  # every epoch's metrics
        run.finish(tags)
"""

from __future__ import annotations

import os
import sys

from data_prep import locations
from mixcl_ray import tracking


class StandaloneRun:
    """The MLflow run of one command. An object store under ``--storage`` cannot hold the
    SQLite store: without ``MLFLOW_TRACKING_URI`` the command then runs untracked and says so."""

    def __init__(self, stage: str, storage, experiment: str, name: str, params: dict):
        self.stage, self.storage, self.experiment = stage, storage, experiment
        self.name, self.params = name, params
        self.uri = self.run_id = None
        self.callbacks: list = []

    def __enter__(self) -> StandaloneRun:
        if locations.is_remote(self.storage) and not os.environ.get("MLFLOW_TRACKING_URI"):
            print(
                "not tracked in MLflow: an object store cannot hold the SQLite tracking store "
                "(set MLFLOW_TRACKING_URI to track this run)",
                file=sys.stderr,
            )
            return self
        self.uri = tracking.default_tracking_uri(self.storage)
        tracking.check_reachable(self.uri)
        root = None if locations.is_remote(self.storage) else f"{self.storage}/mlartifacts"
        experiment_id = tracking.ensure_experiment(self.uri, self.experiment, root)
        version = tracking.code_version()
        tags = {"mixcl.stage": self.stage, **({tracking.CODE_TAG: version} if version else {})}
        self.run_id = tracking.start_run(self.uri, experiment_id, self.name, tags, self.params)
        self.callbacks = [tracking.EpochMetricsCallback(self.uri, self.run_id)]
        print(f"MLflow run {self.run_id} in {tracking.safe_uri(self.uri)} ({self.experiment})")
        return self

    def log_model(self, best_model, card: dict, register: str | None = None) -> str | None:
        """The fine-tuned model as this run's MLflow model; its URI (None: untracked)."""
        if self.run_id is None:
            return None
        from mixcl_ray.mlflow_model import log_model

        return log_model(self.uri, self.run_id, best_model, card, register)

    def finish(self, tags: dict) -> None:
        if self.run_id is not None:
            tracking.set_tags(self.uri, self.run_id, tags)

    def __exit__(self, kind, err, tb) -> None:
        if self.run_id is None:
            return
        if err is None:
            tracking.end_run(self.uri, self.run_id, "FINISHED")
        else:
            tracking.fail_run(self.uri, self.run_id, err)
