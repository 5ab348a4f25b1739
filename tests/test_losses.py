"""The MixCL losses against independent, straightforward references, known limits, partial
labels, zero weights and gradients."""

import math

import numpy as np
import pytest
import torch

from mixcl_ray.config import LossConfig, ModelConfig
from mixcl_ray.data.pairs import example_keys, restored_views
from mixcl_ray.losses import (
    IdentityConsistencyLoss,
    LabelConsistencyLoss,
    MixCLLoss,
    NonFiniteLossError,
    ReconstructionConsistencyLoss,
    label_floor,
    sample_voxels,
    view_outputs,
)
from mixcl_ray.models import MixCLModel

torch.manual_seed(0)


def reference_ntxent(z1, z2, tau):
    """Loop over anchors, as the SimCLR paper writes it."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        p = (i + b) % n
        num = math.exp(float(z[i] @ z[p]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


def reference_supcon(e, labels, annotated, tau):
    """Loop over anchors and candidates with the partial-label rules written out."""
    e = e.double()
    e = e / e.norm(dim=1, keepdim=True)
    n = e.shape[0]
    losses = []
    for i in range(n):
        li = int(labels[i])
        if li == 0:
            continue
        pos, den = [], []
        for a in range(n):
            if a == i:
                continue
            la = int(labels[a])
            s = float(e[i] @ e[a]) / tau
            if la == li:
                pos.append(s)
                den.append(s)
            elif la > 0 or bool(annotated[a, li]):
                den.append(s)
        if not pos:
            continue
        log_den = math.log(sum(math.exp(s) for s in den))
        losses.append(-sum(s - log_den for s in pos) / len(pos))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("b, g, tau", [(2, 8, 0.1), (5, 16, 0.5), (8, 4, 1.0)])
def test_identity_matches_reference(b, g, tau):
    z1, z2 = torch.randn(b, g), torch.randn(b, g)
    assert IdentityConsistencyLoss(tau)(z1, z2).item() == pytest.approx(
        reference_ntxent(z1, z2, tau), abs=1e-5
    )


def test_identity_of_identical_orthogonal_views_has_its_analytic_value():
    b, tau = 4, 0.2
    z = torch.eye(8)[:b] * 3.0  # orthogonal, any scale
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * b - 2))
    assert IdentityConsistencyLoss(tau)(z, z.clone()).item() == pytest.approx(expected, abs=1e-5)


def test_identity_invariances():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    loss = IdentityConsistencyLoss(0.1)
    perm = torch.randperm(6)
    assert loss(z1 * 5, z2 * 0.1).item() == pytest.approx(loss(z1, z2).item(), abs=1e-5)
    assert loss(z1[perm], z2[perm]).item() == pytest.approx(loss(z1, z2).item(), abs=1e-5)
    assert loss(z2, z1).item() == pytest.approx(loss(z1, z2).item(), abs=1e-5)


def test_identity_rejects_bad_shapes():
    with pytest.raises(ValueError):
        IdentityConsistencyLoss(0.1)(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError):
        IdentityConsistencyLoss(0.1)(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="temperature"):
        IdentityConsistencyLoss(0.0)


def _random_voxels(n=40, e=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, e, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    annotated = torch.rand(n, k, generator=g) < 0.5
    annotated[torch.arange(n), labels] = True  # a voxel's own class is annotated by its source
    return emb, labels, annotated


@pytest.mark.parametrize("seed, tau", [(0, 0.1), (1, 0.3), (2, 1.0)])
def test_label_matches_reference(seed, tau):
    emb, labels, annotated = _random_voxels(seed=seed)
    got = LabelConsistencyLoss(tau)(emb, labels, annotated).item()
    assert got == pytest.approx(reference_supcon(emb, labels, annotated, tau), abs=1e-5)


def test_separated_classes_give_a_lower_label_loss_than_random():
    labels = torch.arange(1, 5).repeat_interleave(10)
    annotated = torch.ones(40, 5, dtype=torch.bool)
    separated = torch.eye(8)[labels] + 0.01 * torch.randn(40, 8)
    loss = LabelConsistencyLoss(0.1)
    assert loss(separated, labels, annotated) < 0.5 * loss(torch.randn(40, 8), labels, annotated)


def test_label_floor_is_the_loss_of_perfectly_separated_classes_and_a_lower_bound():
    labels = torch.arange(1, 5).repeat_interleave(10)  # 4 classes x 10 voxels: 9 positives each
    annotated = torch.ones(40, 5, dtype=torch.bool)
    floor = label_floor(labels, annotated).item()
    assert floor == pytest.approx(math.log(9))
    loss = LabelConsistencyLoss(0.01)
    assert loss(torch.eye(8)[labels], labels, annotated).item() == pytest.approx(floor, abs=1e-4)
    for seed in range(5):
        emb, lab, ann = _random_voxels(seed=seed)
        assert LabelConsistencyLoss(0.1)(emb, lab, ann).item() > label_floor(lab, ann).item()
    assert label_floor(torch.tensor([1, 2, 0]), torch.ones(3, 3, dtype=torch.bool)) is None


def test_mixcl_reports_the_label_excess_only_for_batches_with_labels():
    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    loss_fn = MixCLLoss(LossConfig())
    out1 = model(torch.rand(2, 1, 32, 32, 32), heads=loss_fn.heads)
    out2 = model(torch.rand(2, 1, 32, 32, 32), heads=loss_fn.heads)
    batch, diagnostics = _batch(), {}
    terms = loss_fn(
        out1, out2, batch, generator=torch.Generator().manual_seed(0), diagnostics=diagnostics
    )
    assert set(terms) == {"loss", "identity", "label", "reconstruction"}
    assert 0 < diagnostics["label_excess"].item() < terms["label"].item()
    unlabelled, diagnostics = dict(batch, label=torch.full_like(batch["label"], 255)), {}
    loss_fn(out1, out2, unlabelled, diagnostics=diagnostics)
    assert diagnostics == {}


def test_partial_labels_never_make_false_negatives():
    """A background voxel of a source that does not label spleen may be spleen: moving it onto
    the spleen cluster must not change the loss; a background voxel of a source that labels
    spleen is a real negative and must."""
    spleen = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, -0.05]])
    other = torch.tensor([[0.0, 1.0], [0.1, 0.9]])  # class 2
    emb = torch.cat([spleen, other])
    labels = torch.tensor([1, 1, 1, 2, 2])
    annotated = torch.tensor(
        [[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 1]], dtype=torch.bool
    )
    loss = LabelConsistencyLoss(0.1)
    base = loss(emb, labels, annotated)

    def with_background(vector, source_labels_spleen):
        row = torch.tensor([[True, source_labels_spleen, not source_labels_spleen]])
        return loss(
            torch.cat([emb, vector[None]]),
            torch.cat([labels, torch.tensor([0])]),
            torch.cat([annotated, row]),
        )

    near_spleen = torch.tensor([1.0, 0.02])
    # source annotates class 2 only: for spleen anchors the voxel is unknown -> left out
    unknown = with_background(near_spleen, source_labels_spleen=False)
    unknown_far = with_background(torch.tensor([-1.0, 0.0]), source_labels_spleen=False)
    assert unknown_far.item() != pytest.approx(
        unknown.item()
    )  # it is a negative for class 2 anchors
    spleen_only = loss(
        torch.cat([spleen, near_spleen[None]]),
        torch.tensor([1, 1, 1, 0]),
        torch.tensor([[1, 1, 0]] * 3 + [[1, 0, 1]], dtype=torch.bool),
    )
    alone = loss(spleen, torch.tensor([1, 1, 1]), torch.tensor([[1, 1, 0]] * 3, dtype=torch.bool))
    assert spleen_only.item() == pytest.approx(alone.item(), abs=1e-6)  # no false negative
    # a source that labels spleen says this voxel is not spleen: now it is a negative
    known = with_background(near_spleen, source_labels_spleen=True)
    assert known > base + 0.1


def test_unlabelled_patches_contribute_nothing():
    emb = torch.randn(2, 4, 4, 4, 4)
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    labels[0, :2] = 1
    labels[1] = 255
    annotated = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    e, lab, ann = sample_voxels(
        (emb, emb), labels, annotated, voxels_per_class=1000, background_voxels=1000
    )
    assert e.shape == (2 * 64, 4)  # 64 voxels of patch 0, none of patch 1, two views
    assert (ann[:, 1]).all()


def test_voxel_sampling_is_class_balanced_and_capped():
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.uint8)
    labels[:, :6] = 1  # a large class
    labels[0, 7, 0, :3] = 2  # a tiny class
    emb = torch.randn(2, 3, 8, 8, 8)
    annotated = torch.ones(2, 3, dtype=torch.bool)
    e, lab, _ = sample_voxels(
        (emb, emb + 1),
        labels,
        annotated,
        voxels_per_class=20,
        background_voxels=10,
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(lab, minlength=3).tolist()
    assert counts == [20, 40, 6]  # (bg 10, class 1 capped at 20, class 2 all 3) x two views
    m = e.shape[0] // 2
    assert torch.allclose(e[m:], e[:m] + 1)  # the same locations in both views


def test_views_cropped_apart_draw_their_voxels_from_their_own_labels():
    """Shifted views (ViewConfig.crop_offset) are not aligned: each view's voxels are drawn from its
    own label map, with the same caps, and keep that map's class."""
    labels1 = torch.zeros(2, 8, 8, 8, dtype=torch.uint8)
    labels2 = torch.zeros(2, 8, 8, 8, dtype=torch.uint8)
    labels1[:, :4] = 1  # class 1 in the first half of view 1, class 2 only in view 2
    labels2[:, 4:] = 1
    labels2[1, 0, 0, :5] = 2
    # each voxel's embedding holds its class, so a location drawn from the wrong map shows
    emb1, emb2 = labels1[:, None].float().expand(-1, 3, -1, -1, -1), labels2[:, None].float()
    emb2 = emb2.expand(-1, 3, -1, -1, -1) + 10
    annotated = torch.ones(2, 3, dtype=torch.bool)
    e, lab, ann = sample_voxels(
        (emb1, emb2),
        (labels1, labels2),
        annotated,
        voxels_per_class=20,
        background_voxels=10,
        generator=torch.Generator().manual_seed(0),
    )
    view2 = e[:, 0] >= 10
    assert torch.bincount(lab[~view2], minlength=3).tolist() == [10, 20, 0]
    assert torch.bincount(lab[view2], minlength=3).tolist() == [10, 20, 5]
    assert torch.equal(e[~view2, 0].long(), lab[~view2])
    assert torch.equal(e[view2, 0].long() - 10, lab[view2])
    assert ann.shape == (e.shape[0], 3)


def test_mixcl_step_on_views_cropped_apart():
    """A MixCL step on a batch with a label per view: every term finite, gradients reach the
    encoder, and the label term differs from the one that takes view 1's labels for both."""
    torch.manual_seed(0)
    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    loss_fn = MixCLLoss(LossConfig())
    batch = _batch()
    batch["input1"] = batch["clean1"] + 0.1
    batch["label2"] = torch.roll(batch["label"], shifts=5, dims=1)
    for v in ("1", "2"):
        batch["flips" + v] = torch.zeros(2, 3, dtype=torch.bool)
        batch["rot" + v] = torch.zeros(2, dtype=torch.long)
    out1, out2 = view_outputs(model, loss_fn.heads, batch)
    terms = loss_fn(out1, out2, batch, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"identity", "label", "reconstruction", "loss"}
    terms["loss"].backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert next(model.backbone.encoder.parameters()).grad.abs().sum() > 0
    aligned = {k: v for k, v in batch.items() if k != "label2"}
    again = loss_fn.label_term(out1, out2, aligned, torch.Generator().manual_seed(0))
    assert not torch.isclose(again, terms["label"])


def test_label_loss_without_positives_is_zero_with_gradient():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = LabelConsistencyLoss(0.1)(
        emb, torch.tensor([1, 2, 0]), torch.ones(3, 3, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0 and emb.grad is not None


def test_identity_loss_passes_gradcheck():
    z1 = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    z2 = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: IdentityConsistencyLoss(0.5)(a, b).double(), (z1, z2)
    )


def test_label_loss_passes_gradcheck_with_partial_labels():
    # two organs, background voxels of a source that annotates organ 1 only (known negatives
    # of organ 1, left out of organ 2's denominator): every kind of pair in the gradient
    torch.manual_seed(0)
    emb = torch.randn(8, 5, dtype=torch.double, requires_grad=True)
    labels = torch.tensor([1, 1, 1, 2, 2, 0, 0, 2])
    annotated = torch.ones(8, 3, dtype=torch.bool)
    annotated[5:7, 2] = False
    loss_fn = LabelConsistencyLoss(0.2)
    assert loss_fn(emb, labels, annotated).item() > 0
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels, annotated), (emb,))


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_reconstruction_loss_passes_gradcheck(kind):
    torch.manual_seed(0)
    restored = torch.rand(2, 1, 3, 3, 3, dtype=torch.double, requires_grad=True)
    clean = torch.rand(2, 1, 3, 3, 3, dtype=torch.double)
    loss_fn = ReconstructionConsistencyLoss(kind)
    assert torch.autograd.gradcheck(lambda r: loss_fn(r, clean), (restored,))


def test_reconstruction_matches_reference():
    a, b = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 1, 4, 4, 4)
    assert ReconstructionConsistencyLoss("l1")(a, b).item() == pytest.approx(
        (a - b).abs().mean().item(), abs=1e-6
    )
    assert ReconstructionConsistencyLoss("mse")(a, b).item() == pytest.approx(
        ((a - b) ** 2).mean().item(), abs=1e-6
    )


def _batch(b=2, size=32, k=3):
    labels = torch.zeros(b, size, size, size, dtype=torch.uint8)
    labels[:, 2:8, 2:8, 2:8] = 1
    labels[:, 9:14, 9:14, 9:14] = 2
    labels[:, 20:30, 20:30, 20:30] = 2
    return {
        "clean1": torch.rand(b, 1, size, size, size),
        "clean2": torch.rand(b, 1, size, size, size),
        "label": labels,
        "annotated": torch.ones(b, k, dtype=torch.bool),
    }


def _step(weights, model=None):
    model = model or MixCLModel(
        ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8)
    )
    loss_fn = MixCLLoss(LossConfig(l_id=weights[0], l_label=weights[1], l_rec=weights[2]))
    batch = _batch()
    out1 = model(torch.rand(2, 1, 32, 32, 32), heads=loss_fn.heads)
    out2 = model(torch.rand(2, 1, 32, 32, 32), heads=loss_fn.heads)
    terms = loss_fn(out1, out2, batch, step=3)
    model.zero_grad()
    terms["loss"].backward()
    return model, terms


@pytest.mark.parametrize(
    "term, weights, head",
    [
        ("identity", (1, 0, 0), "global_head"),
        ("label", (0, 1, 0), "dense_head"),
        ("reconstruction", (0, 0, 1), "reconstruction_head"),
    ],
)
def test_every_term_alone_reaches_the_encoder_and_others_get_no_gradient(term, weights, head):
    model, terms = _step(weights)
    assert set(terms) == {"loss", term}
    assert terms["loss"].item() == pytest.approx(terms[term].item())
    encoder_grad = sum(
        p.grad.abs().sum().item() for p in model.backbone.encoder.parameters() if p.grad is not None
    )
    assert encoder_grad > 0
    for other in {"global_head", "dense_head", "reconstruction_head"} - {head}:
        assert all(p.grad is None for p in getattr(model, other).parameters()), other


@pytest.mark.parametrize(
    "weights, contrastive_input",
    [((1, 1, 1), "clean"), ((1, 0, 0), "input"), ((0, 1, 0), "input"), ((0, 0, 1), None)],
)
def test_view_outputs_give_the_contrastive_heads_clean_views(weights, contrastive_input):
    """One forward pass for both views: with the reconstruction term and a contrastive term
    (MixCL), the global and dense heads see the clean views and the reconstruction head the
    first view's corrupted input (the identity term collapsed to chance on corrupted views); a
    single term sees the network inputs. Each output equals that of its own forward pass."""
    torch.manual_seed(0)
    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    loss_fn = MixCLLoss(LossConfig(l_id=weights[0], l_label=weights[1], l_rec=weights[2]))
    batch = _batch()
    for v in ("1", "2"):
        batch["input" + v] = torch.rand(2, 1, 32, 32, 32)
        batch["flips" + v] = torch.tensor([[True, False, True], [False, False, False]])
        batch["rot" + v] = torch.tensor([1, 3]) if v == "1" else torch.tensor([0, 2])
    outs = view_outputs(model, loss_fn.heads, batch)
    mixcl = contrastive_input == "clean"
    for v, out in zip(("1", "2"), outs, strict=True):
        # MixCL restores the first view's corrupted input only (3B patches in the pass)
        assert set(out) == {
            {"global": "global_embedding", "dense": "voxel_embeddings"}.get(h, h)
            for h in loss_fn.heads
            if not (mixcl and v == "2" and h == "reconstruction")
        }
        for head, name in (("global", "global_embedding"), ("dense", "voxel_embeddings")):
            if head in loss_fn.heads:
                alone = model(
                    batch[contrastive_input + v], (head,), batch["flips" + v], batch["rot" + v]
                )
                torch.testing.assert_close(out[name], alone[name], atol=1e-5, rtol=1e-4)
        if "reconstruction" in out:
            alone = model(
                batch["input" + v], ("reconstruction",), batch["flips" + v], batch["rot" + v]
            )
            torch.testing.assert_close(
                out["reconstruction"], alone["reconstruction"], atol=1e-5, rtol=1e-4
            )


def test_total_is_the_weighted_sum():
    loss_fn = MixCLLoss(LossConfig(l_id=0.5, l_label=2.0, l_rec=3.0))
    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    x1, x2 = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    terms = loss_fn(model(x1), model(x2), _batch(), generator=torch.Generator().manual_seed(1))
    expected = 0.5 * terms["identity"] + 2.0 * terms["label"] + 3.0 * terms["reconstruction"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_non_finite_loss_names_term_and_step():
    loss_fn = MixCLLoss(LossConfig(l_id=0, l_label=0, l_rec=1))
    out = {"reconstruction": torch.full((2, 1, 4, 4, 4), float("nan"))}
    batch = {"clean1": torch.zeros(2, 1, 4, 4, 4), "clean2": torch.zeros(2, 1, 4, 4, 4)}
    with pytest.raises(
        NonFiniteLossError, match="non-finite reconstruction consistency loss .* at step 17"
    ):
        loss_fn(out, out, batch, step=17)


def test_all_weights_zero_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        MixCLLoss(LossConfig(l_id=0, l_label=0, l_rec=0))


def test_label_consistency_alone_on_an_unlabelled_batch_still_backpropagates():
    """A batch of unlabelled patches gives label consistency nothing to learn; the loss must
    still be connected to the model (every DDP rank runs backward), with zero gradients."""
    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    loss_fn = MixCLLoss(LossConfig(l_id=0, l_label=1, l_rec=0))
    batch = _batch()
    batch["label"] = torch.full_like(batch["label"], 255)
    batch["annotated"] = torch.zeros_like(batch["annotated"])
    out1 = model(torch.rand(2, 1, 32, 32, 32), heads=loss_fn.heads)
    out2 = model(torch.rand(2, 1, 32, 32, 32), heads=loss_fn.heads)
    terms = loss_fn(out1, out2, batch, generator=torch.Generator().manual_seed(0))
    assert terms["loss"].item() == 0.0 and terms["loss"].requires_grad
    terms["loss"].backward()
    grads = [p.grad for p in model.dense_head.parameters()]
    assert all(g is not None and not g.any() for g in grads)


@pytest.mark.parametrize(
    "weights, restored",
    [
        ((1, 1, 1), 1),
        ((1, 0, 1), 1),
        ((0, 1, 1), 1),
        ((0, 0, 1), 2),
        ((1, 1, 0), 0),
        ((1, 0, 0), 0),
    ],
)
def test_a_step_needs_only_the_arrays_the_feed_ships(weights, restored):
    """The feed ships ``example_keys(restored_views(...))`` and nothing else (MixCL: no second
    corrupted view): the step of every term combination runs on exactly those arrays."""
    assert restored_views(*weights) == restored
    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    loss_fn = MixCLLoss(LossConfig(l_id=weights[0], l_label=weights[1], l_rec=weights[2]))
    full = _batch()
    for v in ("1", "2"):
        full["input" + v] = torch.rand(2, 1, 32, 32, 32)
        full["flips" + v] = torch.zeros(2, 3, dtype=torch.bool)
        full["rot" + v] = torch.zeros(2, dtype=torch.int64)
    batch = {k: full[k] for k in (*example_keys(restored), "annotated")}
    terms = loss_fn(*view_outputs(model, loss_fn.heads, batch), batch, step=1)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])


def _gathered_identity(rank: int, world: int, init: str, z1, z2, out: dict) -> None:
    """One worker of ``test_identity_negatives_gathered_across_workers``: its share of the
    batch through the gathered loss; its loss and its inputs' gradients into ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        mine = [z[rank * b : (rank + 1) * b].clone().requires_grad_() for z in (z1, z2)]
        loss = IdentityConsistencyLoss(0.3, gather=True)(*mine)
        loss.backward()
        out[rank] = (loss.item(), mine[0].grad, mine[1].grad)
    finally:
        dist.destroy_process_group()


def test_identity_negatives_gathered_across_workers(tmp_path):
    """Two gloo workers, each with half of the batch: the mean of their gathered losses is the
    whole batch's loss on one process, and each worker's gradients (summed over the workers'
    losses, as the gather's backward does, then averaged as DDP does) are the whole batch's."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    world, b = 2, 3
    z1, z2 = torch.randn(world * b, 8, dtype=torch.double), torch.randn(world * b, 8).double()
    whole = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    expected = IdentityConsistencyLoss(0.3)(*whole)
    expected.backward()
    out = mp.Manager().dict()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_gathered_identity, args=(world, init, z1, z2, out), nprocs=world)
    losses = [out[r][0] for r in range(world)]
    assert sum(losses) / world == pytest.approx(expected.item(), abs=1e-9)
    assert losses[0] != pytest.approx(losses[1])  # each worker's own anchors
    for rank in range(world):
        rows = slice(rank * b, (rank + 1) * b)
        for view in (0, 1):
            assert torch.allclose(out[rank][1 + view] / world, whole[view].grad[rows], atol=1e-9)
    # without gathering, a worker only sees its own batch: another loss
    alone = IdentityConsistencyLoss(0.3, gather=True)(z1[:b], z2[:b])  # no process group
    assert alone.item() == pytest.approx(IdentityConsistencyLoss(0.3)(z1[:b], z2[:b]).item())


@pytest.mark.parametrize("cropped_apart", [False, True])
def test_warped_views_leave_the_voxels_a_view_did_not_see_out_of_the_label_term(cropped_apart):
    """With warps, the model says which patch voxels each view saw; the label term draws only
    from those (both views' at once when the views are aligned, each its own when cropped
    apart), and a MixCL step on warped views runs and back-propagates."""
    from mixcl_ray.data.views import ViewConfig, random_warp
    from mixcl_ray.losses.mixcl import seen_labels

    label = torch.ones(1, 4, 4, 4, dtype=torch.uint8)
    valid1 = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    valid1[:, :2] = True
    valid2 = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    valid2[:, 1:] = True
    both = seen_labels(label, valid1, valid2)
    assert (both[:, 1] == 1).all() and (both[:, [0, 2, 3]] == 255).all()
    one, two = seen_labels((label, label * 2), valid1, valid2)
    assert (one[:, :2] == 1).all() and (one[:, 2:] == 255).all()
    assert (two[:, 1:] == 2).all() and (two[:, 0] == 255).all()

    model = MixCLModel(ModelConfig(features=(4, 4, 8, 8, 16, 4), global_dim=8, dense_dim=8))
    loss_fn = MixCLLoss(LossConfig())
    assert loss_fn.config.l_id > 0 and loss_fn.config.l_label > 0 and loss_fn.config.l_rec > 0
    batch = _batch()
    rng = np.random.default_rng(0)
    views = ViewConfig(rotate_degrees=15, zoom=0.15)
    for v in ("1", "2"):
        batch["input" + v] = torch.rand(2, 1, 32, 32, 32)
        batch["flips" + v] = torch.zeros(2, 3, dtype=torch.bool)
        batch["rot" + v] = torch.zeros(2, dtype=torch.int64)
        batch["warp" + v] = torch.from_numpy(np.stack([random_warp(rng, views) for _ in range(2)]))
    if cropped_apart:
        batch["label2"] = batch["label"].clone()
    batch = {k: batch[k] for k in (*example_keys(1, cropped_apart, warped=True), "annotated")}
    out1, out2 = view_outputs(model, loss_fn.heads, batch)
    assert out1["voxel_valid"].shape == (2, 32, 32, 32) and not out1["voxel_valid"].all()
    terms = loss_fn(out1, out2, batch, step=1)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and terms["label"] > 0
    assert model.dense_head.net[0].weight.grad.abs().sum() > 0
