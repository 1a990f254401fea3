"""Losses of the adaptation stage: gradient reversal, the cosine-weighted triplet loss, domain discriminators.

- ``GradientReversal`` / ``grad_reverse``: identity forward, gradient multiplied by ``-coeff`` backward
  (Ganin & Lempitsky), used in front of every domain discriminator so the feature extractor learns to fool it.
- ``cosine_triplet_loss``: the foreground alignment loss of the method (spec section 5):
  ``mean_i  s_i * relu(d(a_i, p_i) - d(a_i, n_i) + margin)`` on unit vectors, ``d`` the squared L2 distance and
  ``s_i = cos(a_i, p_i)`` detached, so visually closer pairs are pulled harder.
- ``ImageDiscriminator``: the fully convolutional image-level discriminator of Adaptive Teacher, applied to the
  backbone map; ``FeatureDiscriminator``: an MLP on 1024-d instance/background embeddings.
- ``domain_bce``: binary cross-entropy of discriminator logits against a constant domain label.
- ``adversarial_terms``: the adversarial loss and the discriminator's balanced accuracy on the same batch
  (a diagnostic: computed before the update, so it is the accuracy on samples the discriminator has not
  been stepped on yet); ``triplet_stats``: share of active triplets and the mean cosines of a triplet batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``-coeff`` in the backward pass."""
    return _GradReverse.apply(x, float(coeff))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` with a fixed coefficient."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        if coeff < 0:
            raise ValueError(f"gradient reversal coefficient must be >= 0, got {coeff}")
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def cosine_triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 1.5
) -> torch.Tensor:
    """Cosine-weighted triplet loss on L2-normalised vectors (rows are triplets).

    ``anchor``, ``positive``, ``negative``: [K, D]. Returns a scalar; with K = 0 it returns a zero that is
    still connected to ``anchor``'s graph (so every parameter that produced the anchor gets a zero gradient
    instead of none, which keeps distributed gradient reduction in step).
    """
    if anchor.shape != positive.shape or anchor.shape != negative.shape or anchor.dim() != 2:
        raise ValueError(
            f"triplet loss needs three [K, D] tensors of equal shape, got {tuple(anchor.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    a = F.normalize(anchor, dim=1)
    p = F.normalize(positive, dim=1)
    n = F.normalize(negative, dim=1)
    d_ap = (a - p).pow(2).sum(dim=1)
    d_an = (a - n).pow(2).sum(dim=1)
    weight = (a * p).sum(dim=1).detach()
    return (weight * F.relu(d_ap - d_an + margin)).mean()


@torch.no_grad()
def triplet_stats(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> dict:
    """``{"active", "cos_ap", "cos_an"}`` of a triplet batch (floats; NaN with no triplet): the share of
    triplets whose hinge ``d(a,p) - d(a,n) + margin`` is > 0 (those that give a gradient), and the mean cosine
    of anchor-positive and anchor-negative. With unit vectors ``d = 2 - 2 cos``, so a triplet is active when
    ``cos(a,p) - cos(a,n) < margin / 2``."""
    if anchor.shape[0] == 0:
        nan = float("nan")
        return {"active": nan, "cos_ap": nan, "cos_an": nan}
    a, p, n = (F.normalize(t.detach().float(), dim=1) for t in (anchor, positive, negative))
    cos_ap, cos_an = (a * p).sum(dim=1), (a * n).sum(dim=1)
    hinge = (2 - 2 * cos_ap) - (2 - 2 * cos_an) + margin
    return {"active": float((hinge > 0).float().mean()), "cos_ap": float(cos_ap.mean()), "cos_an": float(cos_an.mean())}


class ImageDiscriminator(nn.Module):
    """Adaptive Teacher's image-level discriminator: four 3x3 convolutions, leaky ReLU, one logit per cell."""

    def __init__(self, in_channels: int, width: int = 256):
        super().__init__()
        half = max(width // 2, 1)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, half, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(half, half, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(half, 1, 3, padding=1),
        )

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.net(feature_map)


class FeatureDiscriminator(nn.Module):
    """Binary domain discriminator on embeddings [K, D] -> logits [K, 1]."""

    def __init__(self, in_dim: int = 1024, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def domain_bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Mean BCE-with-logits of ``logits`` against the constant ``label`` (0 = source, 1 = target)."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(label)))


def adversarial_loss(
    discriminator: nn.Module,
    source: torch.Tensor,
    target: torch.Tensor,
    coeff: float = 1.0,
) -> torch.Tensor:
    """Domain-adversarial loss: ``BCE(D(GRL(source)), 0) + BCE(D(GRL(target)), 1)``.

    Minimising it trains the discriminator to tell the domains apart while the reversed gradient drives
    whatever produced ``source`` / ``target`` to make them indistinguishable.
    """
    return adversarial_terms(discriminator, source, target, coeff)[0]


def adversarial_terms(
    discriminator: nn.Module, source: torch.Tensor, target: torch.Tensor, coeff: float = 1.0
) -> tuple[torch.Tensor, float]:
    """:func:`adversarial_loss` and the discriminator's balanced accuracy on this batch, ``(loss, accuracy)``:
    the mean of the shares of source outputs with logit < 0 and of target outputs with logit > 0 (every
    output counts: one per embedding, one per cell of an image-level map). NaN when a side is empty."""
    source_logits = discriminator(grad_reverse(source, coeff))
    target_logits = discriminator(grad_reverse(target, coeff))
    loss = domain_bce(source_logits, SOURCE_LABEL) + domain_bce(target_logits, TARGET_LABEL)
    if source_logits.numel() == 0 or target_logits.numel() == 0:
        return loss, float("nan")
    with torch.no_grad():
        accuracy = 0.5 * float((source_logits < 0).float().mean()) + 0.5 * float((target_logits > 0).float().mean())
    return loss, accuracy
