"""Adversarial loss and CUT's PatchNCE loss (Park et al., ECCV 2020).

PatchNCE: features of ``x`` and ``G(x)`` from several encoder layers; the same random spatial locations
(256 per layer) in both; a per-layer MLP (C -> 256 -> 256) and L2 normalisation; the positive for a query
patch of ``G(x)`` is the patch of ``x`` at the same place, the negatives are the other sampled patches of
the same image; cross-entropy over ``[positive, negatives] / tau`` (tau = 0.07). Keys are detached, so the
gradient reaches the generator (encoder included) through the query path ``E(G(x))`` only, as in CUT.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vspa.translation.generator import Encoder, init_weights
from vspa.utils import VspaError

GAN_MODES = ("lsgan", "bce")


class GANLoss(nn.Module):
    """``lsgan``: mean squared error to 1 (real) / 0 (fake), as CUT; ``bce``: binary cross-entropy on logits."""

    def __init__(self, mode: str = "lsgan"):
        super().__init__()
        if mode not in GAN_MODES:
            raise VspaError(f"translate: gan_mode must be one of {', '.join(GAN_MODES)}, got {mode!r}.")
        self.mode = mode

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.full_like(prediction, 1.0 if target_is_real else 0.0)
        if self.mode == "lsgan":
            return F.mse_loss(prediction, target)
        return F.binary_cross_entropy_with_logits(prediction, target)


class PatchSampler(nn.Module):
    """CUT's ``PatchSampleF``: sample the same locations in each layer, per-layer MLP, L2 normalisation."""

    def __init__(self, channels: Sequence[int], dim: int = 256):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)) for c in channels
        )
        init_weights(self)

    def forward(self, feats: Sequence[torch.Tensor], num_patches: int, patch_ids: Sequence[torch.Tensor] | None = None):
        """Returns ``([B * P, dim] per layer, patch ids per layer)``; new random ids unless ``patch_ids`` given."""
        out, ids_out = [], []
        for i, (feat, mlp) in enumerate(zip(feats, self.mlps)):
            b, c, h, w = feat.shape
            flat = feat.flatten(2).transpose(1, 2)  # [B, HW, C]
            if patch_ids is None:
                ids = torch.randperm(h * w, device=feat.device)[: min(num_patches, h * w)]
            else:
                ids = patch_ids[i]
            sample = flat[:, ids, :].flatten(0, 1)  # [B * P, C], batch-major
            out.append(F.normalize(mlp(sample), dim=1))
            ids_out.append(ids)
        return out, ids_out


def patch_nce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, batch_size: int, tau: float = 0.07) -> torch.Tensor:
    """Per-patch InfoNCE ``[B * P]``: query i's positive is key i; negatives are the other keys of its image."""
    feat_k = feat_k.detach()
    dim = feat_q.shape[1]
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)  # [B*P, 1]
    q = feat_q.view(batch_size, -1, dim)
    k = feat_k.view(batch_size, -1, dim)
    n = q.shape[1]
    l_neg = torch.bmm(q, k.transpose(1, 2))  # [B, P, P]
    # the diagonal is the positive itself: exp(-10) makes it (almost) vanish from the negatives, as CUT
    l_neg = l_neg.masked_fill(torch.eye(n, dtype=torch.bool, device=q.device)[None], -10.0)
    logits = torch.cat([l_pos, l_neg.view(-1, n)], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=q.device), reduction="none")


class PatchNCELoss(nn.Module):
    """``L_NCE(src, tgt)``: src = the translator's input, tgt = its output; mean over layers and patches."""

    def __init__(
        self, encoder: Encoder, layers: Sequence[int], num_patches: int = 256, dim: int = 256, tau: float = 0.07
    ):
        super().__init__()
        self.layers = list(layers)
        bad = [i for i in self.layers if not 0 <= i < len(encoder.tap_channels)]
        if bad:
            raise VspaError(
                f"PatchNCE: layer taps {bad} do not exist; the encoder has taps 0..{len(encoder.tap_channels) - 1}."
            )
        self.num_patches = num_patches
        self.tau = tau
        self.sampler = PatchSampler([encoder.tap_channels[i] for i in self.layers], dim)

    def forward(self, encoder: Encoder, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, feat_q = encoder(tgt, self.layers)
        with torch.no_grad():  # keys are detached in the loss anyway: no graph needed
            _, feat_k = encoder(src, self.layers)
            k_pool, ids = self.sampler(feat_k, self.num_patches)
        q_pool, _ = self.sampler(feat_q, self.num_patches, ids)
        total = sum(patch_nce_loss(q, k, src.shape[0], self.tau).mean() for q, k in zip(q_pool, k_pool))
        return total / len(self.layers)
