"""A fine-tuned model as an MLflow model: logged under its run with signature and card, loaded
back by ``predict`` from ``runs:/`` and ``models:/`` URIs, and served by MLflow's pyfunc."""

import os

import numpy as np
import pytest
import torch

from data_prep.preprocess import get_preset
from mixcl_ray import tracking
from mixcl_ray.config import FinetuneConfig, ModelConfig, to_dict
from mixcl_ray.mlflow_model import is_mlflow_uri, log_model
from mixcl_ray.models import SegmentationNet
from mixcl_ray.predict import load_model

BEFORE = os.environ.get("MLFLOW_TRACKING_URI")
TINY = ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8)


@pytest.fixture()
def logged(tmp_path):
    config = FinetuneConfig(model=TINY)
    torch.manual_seed(0)
    net = SegmentationNet(TINY, 3)
    card = {
        "class_names": ["background", "liver", "spleen"],
        "preset": get_preset("spleen").as_dict(),
        "modality": "CT",
        "finetune_config": to_dict(config),
        "pretrained": "s3://bucket/pretrain_cache/x/pretrained.pt",
        "data_fingerprint": "f" * 64,
    }
    best = tmp_path / "best_model.pt"
    torch.save({"model": net.state_dict(), "dice": 0.5, "epoch": 3, "card": card}, best)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "models", tmp_path / "artifacts")
    run_id = tracking.start_run(uri, experiment, "finetune", {"mixcl.stage": "finetune"}, {})
    model_uri = log_model(uri, run_id, best, card)
    registered = log_model(uri, run_id, best, card, register="spleen-seg")
    tracking.end_run(uri, run_id)
    return uri, run_id, net, card, model_uri, registered


def test_a_logged_model_loads_back_from_its_uris_with_its_card(logged):
    uri, run_id, net, card, model_uri, registered = logged
    assert model_uri == f"runs:/{run_id}/model" and registered == "models:/spleen-seg/1"
    assert is_mlflow_uri(model_uri) and not is_mlflow_uri("runs/finetune-x")
    for address in (model_uri, registered):
        loaded = load_model(address, tracking_uri=uri)
        assert loaded.card == card and loaded.source == address
        for key, value in net.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=f"runs:/{'0' * 32}/model: cannot read this model from"):
        load_model(f"runs:/{'0' * 32}/model", tracking_uri=uri)


def test_the_logged_model_has_signature_metadata_and_predicts(logged):
    import mlflow

    from mixcl_ray.mlflow_model import tracking_at

    uri, run_id, _, card, model_uri, _ = logged
    assert os.environ.get("MLFLOW_TRACKING_URI") == BEFORE  # logging left the process's URI alone
    with tracking_at(uri):
        info = mlflow.models.get_model_info(model_uri)
        model = mlflow.pyfunc.load_model(model_uri)
    assert info.metadata["class_names"] == card["class_names"]
    assert info.metadata["preset"] == "spleen" and info.metadata["spacing"] == [1.5, 1.5, 2.0]
    assert info.metadata["pretrained"] == card["pretrained"]
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, -1, -1, -1]
    volumes = np.random.default_rng(0).random((2, 1, 32, 32, 40), dtype=np.float32)
    out = model.predict(volumes)
    assert out.shape == (2, 32, 32, 40) and out.dtype == np.uint8 and out.max() <= 2
