"""Networks: named outputs, encoder transfer with key/shape checks through wrappers, configs."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from mixcl_ray.config import LossConfig, ModelConfig, from_dict, loss_config_for, to_dict
from mixcl_ray.models import (
    MixCLModel,
    SegmentationNet,
    check_patch_size,
    load_pretrained,
    save_pretrained,
)

TINY = ModelConfig(features=(4, 8, 8, 16, 16, 8), global_dim=8, dense_dim=8)


def test_mixcl_model_returns_named_outputs():
    out = MixCLModel(TINY)(torch.rand(2, 1, 32, 32, 32))
    assert out["global_embedding"].shape == (2, 8)
    assert out["voxel_embeddings"].shape == (2, 8, 32, 32, 32)
    assert out["reconstruction"].shape == (2, 1, 32, 32, 32)
    only = MixCLModel(TINY)(torch.rand(2, 1, 32, 32, 32), heads=("global",))
    assert set(only) == {"global_embedding"}
    with pytest.raises(ValueError, match="unknown heads"):
        MixCLModel(TINY)(torch.rand(1, 1, 32, 32, 32), heads=("segmentation",))


def test_encoder_dense_source_trains_the_encoder_without_the_decoder():
    """``dense_source: encoder``: the voxel embeddings come from the encoder levels, so the label
    term alone runs no decoder and its gradient reaches every encoder level."""
    model = MixCLModel(ModelConfig(**{**to_dict(TINY), "dense_source": "encoder"}))
    out = model(torch.rand(2, 1, 32, 32, 32), heads=("dense",))
    assert out["voxel_embeddings"].shape == (2, 8, 32, 32, 32)
    out["voxel_embeddings"].square().mean().backward()
    backbone = model.backbone
    assert all(p.grad is not None for p in backbone.encoder.parameters())
    assert all(p.grad is None for p in backbone.decoder.parameters())
    full = model(torch.rand(2, 1, 32, 32, 32))  # with reconstruction, the decoder runs
    assert full["reconstruction"].shape == (2, 1, 32, 32, 32)
    # the encoder and decoder are the decoder source's: a pre-training of either kind loads
    seg = SegmentationNet(TINY, num_classes=2)
    assert seg.backbone.state_dict().keys() == backbone.state_dict().keys()


@pytest.mark.slow
def test_swinunetr_backbone():
    model = MixCLModel(
        ModelConfig(backbone="swinunetr", feature_size=12, global_dim=8, dense_dim=8)
    )
    out = model(torch.rand(1, 1, 64, 64, 64))
    assert out["voxel_embeddings"].shape == (1, 8, 64, 64, 64)
    assert out["global_embedding"].shape == (1, 8)
    assert any(k.startswith("swinViT") for k in model.backbone.encoder.state_dict())
    encoder_source = MixCLModel(
        ModelConfig(backbone="swinunetr", dense_source="encoder", global_dim=8, dense_dim=8)
    )
    dense = encoder_source(torch.rand(1, 1, 64, 64, 64), heads=("dense",))
    assert dense["voxel_embeddings"].shape == (1, 8, 64, 64, 64)


def _equal_parts(a, b):
    for part in ("encoder", "decoder"):
        sa, sb = getattr(a.backbone, part).state_dict(), getattr(b.backbone, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_then_load_into_segmentation_net_leaves_weights_equal(tmp_path):
    pre = MixCLModel(TINY)
    path = tmp_path / "pretrained.pt"
    save_pretrained(pre, path, config=to_dict(TINY))
    seg = SegmentationNet(TINY, num_classes=3)
    report = load_pretrained(seg, path)
    assert (
        report.ok
        and not report.missing
        and len(report.loaded)
        == len(pre.backbone.encoder.state_dict()) + len(pre.backbone.decoder.state_dict())
    )
    _equal_parts(pre, seg)
    enc_only = SegmentationNet(TINY, num_classes=3)
    report = load_pretrained(enc_only, path, parts=("encoder",))
    assert all(k.startswith("encoder.") for k in report.loaded)


def test_load_through_compile_and_ddp_wrappers(tmp_path):
    pre = MixCLModel(TINY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped_source = torch.nn.parallel.DistributedDataParallel(pre)
        save_pretrained(wrapped_source, tmp_path / "p.pt")
        seg = SegmentationNet(TINY, num_classes=2)
        target = torch.compile(torch.nn.parallel.DistributedDataParallel(seg))
        assert load_pretrained(target, tmp_path / "p.pt").ok
        _equal_parts(pre, seg)
    finally:
        dist.destroy_process_group()


def test_mismatched_networks_are_reported_and_strict_refuses(tmp_path):
    save_pretrained(MixCLModel(TINY), tmp_path / "p.pt")
    other = SegmentationNet(ModelConfig(features=(4, 8, 8, 16, 32, 8)), num_classes=2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(other, tmp_path / "p.pt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing copied
    report = load_pretrained(other, tmp_path / "p.pt", strict=False)
    assert report.shape_mismatch and report.loaded and "shape mismatch" in report.summary()
    swin = SegmentationNet(ModelConfig(backbone="swinunetr", feature_size=12), num_classes=2)
    report = load_pretrained(swin, tmp_path / "p.pt", strict=False)
    assert report.missing and report.unexpected and not report.loaded


def test_patch_size_checks():
    check_patch_size(TINY, (32, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        check_patch_size(TINY, (32, 24, 32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "resnet"}, "backbone"),
        ({"features": (4, 8)}, "features"),
        ({"feature_size": 10}, "feature_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"dense_source": "bottleneck"}, "dense_source"),
    ],
)
def test_model_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"l_id": -1}, "l_id"),
        ({"temperature_label": 0}, "temperature_label"),
        ({"reconstruction": "huber"}, "reconstruction"),
    ],
)
def test_loss_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_config_round_trip_and_methods():
    assert from_dict(ModelConfig, to_dict(TINY)) == TINY
    with pytest.raises(ValueError, match="ModelConfig: unknown keys \\['widht'\\]"):
        from_dict(ModelConfig, {"widht": 3})
    assert loss_config_for("scratch") is None
    assert (loss_config_for("identity").l_id, loss_config_for("identity").l_rec) == (1.0, 0.0)
    assert loss_config_for("mixcl", temperature_id=0.2).temperature_id == 0.2
    # MixCL keeps its three terms on (docs/method.md), as the loss config's own defaults do;
    # l_id sets the identity term's weight
    mixcl = loss_config_for("mixcl")
    assert (mixcl.l_id, mixcl.l_label, mixcl.l_rec) == (1.0, 1.0, 1.0)
    assert loss_config_for("mixcl", l_id=0.1).l_id == 0.1 and LossConfig().l_id == 1.0
    with pytest.raises(ValueError, match="unknown method"):
        loss_config_for("simclr")


@pytest.mark.parametrize("dense_source", ["decoder", "encoder"])
def test_view_transform_maps_embeddings_back_to_the_patch_frame(dense_source):
    from mixcl_ray.data.views import invert_spatial

    model = MixCLModel(ModelConfig(**{**to_dict(TINY), "dense_source": dense_source})).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    flips, rots = torch.tensor([[True, False, True], [False, True, False]]), torch.tensor([1, 3])
    plain = model(x)
    mapped = model(x, flips=flips, rots=rots)
    assert torch.allclose(
        mapped["voxel_embeddings"], invert_spatial(plain["voxel_embeddings"], flips, rots)
    )
    assert torch.allclose(
        mapped["reconstruction"], plain["reconstruction"]
    )  # stays in the view frame
    assert not torch.allclose(mapped["global_embedding"], plain["global_embedding"])


def test_a_check_only_load_needs_no_weights_in_the_network(tmp_path):
    """The fine-tuning driver checks the pre-trained file against a network on the meta device:
    the same report as a real load, nothing allocated, and a mismatch still refused."""
    save_pretrained(MixCLModel(TINY), tmp_path / "p.pt")
    real = load_pretrained(SegmentationNet(TINY, 2), tmp_path / "p.pt", parts=("encoder",))
    with torch.device("meta"):
        ghost = SegmentationNet(TINY, 2)
        other = SegmentationNet(ModelConfig(features=(4, 8, 8, 16, 32, 8)), 2)
    checked = load_pretrained(ghost, tmp_path / "p.pt", parts=("encoder",), copy=False)
    assert checked.summary() == real.summary() and checked.loaded == real.loaded
    assert all(p.is_meta for p in ghost.parameters())
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(other, tmp_path / "p.pt", copy=False)


def test_channels_last_layout_on_cpu_computes_the_same_and_saves_a_plain_state():
    from mixcl_ray.train_utils import network_layout

    torch.manual_seed(0)
    plain = SegmentationNet(TINY, num_classes=3)
    x = torch.rand(2, 1, 32, 32, 32)
    expected = plain(x)
    fast = network_layout(
        SegmentationNet(TINY, num_classes=3), torch.device("cpu"), channels_last=True
    )
    fast.load_state_dict(plain.state_dict())
    convs = [p for p in fast.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout really changed
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    # its weights load into a network in the default layout (predict, MLflow) as they are
    again = SegmentationNet(TINY, num_classes=3)
    again.load_state_dict(fast.state_dict())
    torch.testing.assert_close(again(x), expected, rtol=1e-4, atol=1e-5)
    # off, or on a GPU device, the layout is left as it was
    for device, on in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        kept = network_layout(SegmentationNet(TINY, num_classes=3), device, channels_last=on)
        assert all(p.is_contiguous() for p in kept.parameters())
