"""Unit tests of the adaptation losses, the EMA teacher and pseudo-label filtering (hand-made cases)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vspa.adaptation.losses import (
    FeatureDiscriminator,
    GradientReversal,
    ImageDiscriminator,
    adversarial_loss,
    cosine_triplet_loss,
    domain_bce,
    grad_reverse,
)
from vspa.adaptation.pseudo import filter_pseudo_labels
from vspa.adaptation.teacher import ema_update, make_teacher
from vspa.utils import VspaError

# --------------------------------------------------------------------------- triplet loss


def test_triplet_loss_hand_computed():
    # unit vectors: a = e1, p = (cos 60, sin 60), n = -e1
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.5, math.sqrt(3) / 2]])
    n = torch.tensor([[-1.0, 0.0]])
    # d(a,p) = 2 - 2 cos60 = 1, d(a,n) = 4, s = 0.5 -> 0.5 * relu(1 - 4 + 1.5) = 0
    assert cosine_triplet_loss(a, p, n, margin=1.5).item() == pytest.approx(0.0)
    # with margin 4: 0.5 * (1 - 4 + 4) = 0.5
    assert cosine_triplet_loss(a, p, n, margin=4.0).item() == pytest.approx(0.5)
    # scale invariance: the loss works on unit vectors
    assert cosine_triplet_loss(3 * a, 7 * p, 0.1 * n, margin=4.0).item() == pytest.approx(0.5)


def test_triplet_loss_mean_over_instances():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # s = 1 and s = 0
    n = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # row 0: 1 * relu(0 - 2 + 1.5) = 0; row 1: 0 * ... = 0; margin 3: row 0 -> 1, row 1 -> 0 -> mean 0.5
    assert cosine_triplet_loss(a, p, n, margin=3.0).item() == pytest.approx(0.5)


def test_triplet_loss_gradient_nonzero_and_step_moves_anchor_toward_positive():
    torch.manual_seed(0)
    anchor = torch.randn(6, 16, requires_grad=True)
    positive = anchor.detach() + 0.8 * torch.randn(6, 16)
    negative = anchor.detach() + 1.0 * torch.randn(6, 16)  # a hard negative: every triplet is active
    for i in range(6):  # each triplet on its own is active (positive loss)
        assert cosine_triplet_loss(anchor[i : i + 1], positive[i : i + 1], negative[i : i + 1]).item() > 0
    loss = cosine_triplet_loss(anchor, positive, negative, margin=1.5)
    loss.backward()
    assert anchor.grad.abs().sum().item() > 0

    def dist(x):
        return (nn.functional.normalize(x, dim=1) - nn.functional.normalize(positive, dim=1)).pow(2).sum(1)

    before = dist(anchor.detach())
    with torch.no_grad():
        stepped = anchor - 0.5 * anchor.grad
    after = dist(stepped)
    assert (after < before).all()


def test_triplet_loss_with_negative_equal_to_positive_is_constant():
    # the MILA bug: n = p gives s * margin whatever a is, so no gradient reaches the anchor's direction
    anchor = torch.randn(4, 8, requires_grad=True)
    positive = torch.randn(4, 8)
    loss = cosine_triplet_loss(anchor, positive, positive.clone(), margin=1.5)
    loss.backward()
    assert torch.allclose(anchor.grad, torch.zeros_like(anchor.grad), atol=1e-6)


def test_triplet_loss_empty_and_bad_shapes():
    a = torch.zeros(0, 8, requires_grad=True)
    loss = cosine_triplet_loss(a, torch.zeros(0, 8), torch.zeros(0, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert a.grad is not None
    with pytest.raises(ValueError, match="equal shape"):
        cosine_triplet_loss(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(2, 8))


# --------------------------------------------------------------------------- gradient reversal


@pytest.mark.parametrize("coeff", [1.0, 0.25])
def test_gradient_reversal_flips_and_scales(coeff):
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    (GradientReversal(coeff)(x) * w).sum().backward()
    assert torch.allclose(x.grad, -coeff * w)
    y = torch.randn(5, 3, requires_grad=True)
    out = grad_reverse(y, coeff)
    assert torch.equal(out, y)  # identity forward


def test_gradient_reversal_rejects_negative_coefficient():
    with pytest.raises(ValueError, match=">= 0"):
        GradientReversal(-1.0)


# --------------------------------------------------------------------------- discriminators


def test_domain_bce_matches_formula():
    logits = torch.tensor([[0.0], [2.0]])
    expected_target = (math.log(2) + math.log(1 + math.exp(-2.0))) / 2
    assert domain_bce(logits, 1.0).item() == pytest.approx(expected_target)
    expected_source = (math.log(2) + math.log(1 + math.exp(2.0))) / 2
    assert domain_bce(logits, 0.0).item() == pytest.approx(expected_source)


def test_adversarial_loss_trains_discriminator_and_reverses_features():
    torch.manual_seed(0)
    disc = FeatureDiscriminator(8, hidden=16)
    src = torch.randn(4, 8) + 2.0
    tgt = (torch.randn(4, 8) - 2.0).requires_grad_(True)
    loss = adversarial_loss(disc, src, tgt)
    loss.backward()
    # the discriminator's gradient is the plain BCE gradient; the feature's is the reverse of it
    tgt2 = tgt.detach().clone().requires_grad_(True)
    from vspa.adaptation.losses import domain_bce as bce

    bce(disc(tgt2), 1.0).backward()
    assert torch.allclose(tgt.grad, -tgt2.grad, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_image_discriminator_shape():
    disc = ImageDiscriminator(in_channels=6, width=8)
    out = disc(torch.randn(2, 6, 5, 7))
    assert out.shape == (2, 1, 5, 7)


# --------------------------------------------------------------------------- EMA teacher


def test_ema_update_matches_formula_on_parameters_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(8, 3))  # moves BN running stats and num_batches_tracked
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    keep = 0.9
    ema_update(teacher, student, keep)
    s_state = student.state_dict()
    for key, value in teacher.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, keep * t_before[key] + (1 - keep) * s_state[key]), key
        else:
            assert torch.equal(value, s_state[key]), key
    assert not torch.allclose(teacher[0].weight, student[0].weight)


def test_ema_update_bad_keep_rate_and_structure():
    student = nn.Linear(2, 2)
    with pytest.raises(VspaError, match="ema_keep"):
        ema_update(make_teacher(student), student, 1.5)
    with pytest.raises(VspaError, match="structure"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)


# --------------------------------------------------------------------------- pseudo-labels


def test_filter_pseudo_labels_hand_made():
    dets = [
        {
            "boxes": torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], dtype=torch.float32),
            "labels": torch.tensor([1, 2, 3]),
            "scores": torch.tensor([0.9, 0.8, 0.79]),
        },
        {
            "boxes": torch.tensor([[2, 2, 4, 4]], dtype=torch.float32),
            "labels": torch.tensor([2]),
            "scores": torch.tensor([0.3]),
        },
    ]
    out = filter_pseudo_labels(dets, tau=0.8)
    assert out[0]["labels"].tolist() == [1, 2]  # 0.8 is kept (>=), 0.79 is not
    assert out[0]["boxes"].tolist() == [[0, 0, 10, 10], [5, 5, 20, 20]]
    assert out[0]["labels"].dtype == torch.int64
    assert out[1]["boxes"].shape == (0, 4) and out[1]["labels"].shape == (0,)
    assert [len(d["labels"]) for d in filter_pseudo_labels(dets, tau=0.0)] == [3, 1]


def test_filter_pseudo_labels_errors():
    with pytest.raises(VspaError, match="tau"):
        filter_pseudo_labels([], tau=1.2)
    with pytest.raises(VspaError, match="scores"):
        filter_pseudo_labels([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], tau=0.5)
