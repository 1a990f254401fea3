"""Adaptation training: mean teacher with memory-based foreground and background alignment."""

from vspa.adaptation.losses import (
    FeatureDiscriminator,
    GradientReversal,
    ImageDiscriminator,
    adversarial_loss,
    cosine_triplet_loss,
    grad_reverse,
)
from vspa.adaptation.pseudo import filter_pseudo_labels
from vspa.adaptation.teacher import ema_update, make_teacher

__all__ = [
    "FeatureDiscriminator",
    "GradientReversal",
    "ImageDiscriminator",
    "adversarial_loss",
    "cosine_triplet_loss",
    "ema_update",
    "filter_pseudo_labels",
    "grad_reverse",
    "make_teacher",
]
