"""A fine-tuned model as an MLflow model (pyfunc flavour): the best weights with their model card
(class names, the data preset and its spacing, the fine-tuning config, the pre-training it
started from), a tensor signature, and ``predict`` on volumes preprocessed as the card says.

Every fine-tuning, trial or standalone, logs one (``log_model``) under its run as ``model``;
``predict`` and ``evaluate`` take its URI (``runs:/<run id>/model``, ``models:/<name>/<version>``
once registered, or the logged model's ``models:/m-...``) wherever they take a fine-tuning's
folder (``local_weights``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

MODEL_NAME = "model"
MLFLOW_SCHEMES = ("runs:/", "models:/")

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    PythonModel = object


class SegmentationModel(PythonModel):
    """(N, 1, X, Y, Z) float32 volumes, preprocessed with the card's preset, to (N, X, Y, Z)
    uint8 class maps by MONAI sliding-window inference."""

    def load_context(self, context):
        from mixcl_ray.predict import load_model

        self.loaded = load_model(context.artifacts["best_model"])

    def predict(self, context, model_input, params=None):
        import torch

        from mixcl_ray.evaluate import predict_volume

        config = self.loaded.card["finetune_config"]
        if isinstance(model_input, dict):  # a named tensor input
            model_input = model_input["image"]
        out = []
        for volume in np.asarray(model_input, dtype=np.float32):
            prediction = predict_volume(
                self.loaded.model,
                volume[0],
                self.loaded.patch_size,
                torch.device("cpu"),
                config["sw_batch_size"],
                config["sw_overlap"],
            )
            out.append(prediction[0, 0].numpy().astype(np.uint8))
        return np.stack(out)


@contextlib.contextmanager
def tracking_at(uri: str | None):
    """MLflow's fluent API pointed at ``uri`` (credentials set aside) for the block only: the
    process's tracking URI, which MLflow also writes into the environment, is restored after."""
    import mlflow

    from mixcl_ray import tracking_access

    before = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(tracking_access.set_credentials(uri))
    try:
        yield mlflow.get_tracking_uri()
    finally:
        mlflow.set_tracking_uri(before)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), "segmentation")]),
    )


def card_metadata(card: dict) -> dict:
    """What the MLflow model records of its card, to read without loading the weights."""
    return {
        "class_names": list(card["class_names"]),
        "preset": card["preset"].get("name"),
        "spacing": list(card["preset"].get("spacing", [])),
        "modality": card.get("modality"),
        "pretrained": card.get("pretrained") or "",
        "data_fingerprint": card.get("data_fingerprint"),
    }


def log_model(uri: str, run_id: str, best_model, card: dict, register: str | None = None) -> str:
    """Log ``best_model`` (a path or object-store URI of ``best_model.pt``) as the run's MLflow
    model, registered as ``register`` if given; returns the URI ``predict`` takes."""
    import mlflow

    from data_prep import locations

    with tracking_at(uri) as clean, tempfile.TemporaryDirectory(prefix="mixcl-model-") as tmp:
        local = Path(tmp) / "best_model.pt"
        local.write_bytes(locations.read_bytes(best_model))
        with mlflow.start_run(run_id=run_id):
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=SegmentationModel(),
                artifacts={"best_model": str(local)},
                signature=signature(),
                metadata=card_metadata(card),
                pip_requirements=["mixcl_ray", "torch", "monai"],
                registered_model_name=register,
            )
        if register:
            versions = mlflow.MlflowClient(clean).search_model_versions(f"name = '{register}'")
            version = max(int(v.version) for v in versions if v.run_id == run_id)
            return f"models:/{register}/{version}"
    return f"runs:/{run_id}/{MODEL_NAME}"


def is_mlflow_uri(model: str) -> bool:
    return str(model).startswith(MLFLOW_SCHEMES)


def local_weights(model: str, tracking_uri: str | None, into: Path) -> str:
    """``model`` itself, or for an MLflow model URI its ``best_model.pt`` downloaded into
    ``into`` from ``tracking_uri``."""
    if not is_mlflow_uri(model):
        return model
    import mlflow

    from mixcl_ray import tracking_access

    with tracking_at(tracking_uri) as store:
        try:
            folder = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(into))
        except mlflow.exceptions.MlflowException as err:
            where = tracking_access.safe_uri(store)
            raise ValueError(
                f"{model}: cannot read this model from {where}: {err.message}"
            ) from None
    folder = Path(folder)
    found = sorted(folder.rglob("best_model.pt"))
    if not found:
        raise FileNotFoundError(f"{model} holds no best_model.pt: not a mixcl_ray model")
    return str(found[0])
