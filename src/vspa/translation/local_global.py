"""Local-global contrastive guidance of the attention decoder (the poster's ``L_GA``), DetCo-style.

Two augmented views ``x1``, ``x2`` of each target image (random crop of at least 60 % of the area, flip,
colour jitter, grayscale, blur); each view is also cut into a ``grid x grid`` (4x4) grid of patches. The
online network E -> G_A sees ``x1`` and its patches; a momentum (EMA) copy of E, G_A and the heads sees
``x2`` and its patches. At 4 layers (E's output and G_A's up1, up2 and mask logits), globally pooled
features go through a global MLP head (whole view) and a local MLP head (the concatenated pooled features of
the view's patches). Per layer ``i`` with weight ``w_i`` (0.1, 0.4, 0.7, 1.0), three InfoNCE terms with
queues of momentum keys as negatives (MoCo):

    L_GA = sum_i w_i [ NCE(g1_i, g2_i; Q^g_i) + NCE(l1_i, g2_i; Q^g_i) + NCE(l1_i, l2_i; Q^l_i) ]

(global-global, local-global, local-local). The loss reaches E and G_A (and the heads), never G_C.

Standardised features (issue 17). The supervised layers follow instance norm (and ReLU): their spatial means
are nearly the same for every image (they differ by 3-7 % between images), so the embeddings of all views
point the same way and InfoNCE cannot tell a view of the same image from one of another: L_GA stayed flat.
Each layer's pooled features (whole views and patches apart) are therefore standardised per channel by
running statistics (:class:`RunningStandardize`: the mean and second moment over the recent training batches,
as batch norm in evaluation mode, updated from both branches' detached features), so the heads see what
differs between images. The heads (Xavier gain 1, not CUT's 0.02) and the L2 normalisation then make the
InfoNCE logits cosine similarities. The momentum branch uses the same statistics.

Primed queues (:meth:`LocalGlobalLoss.prime`). MoCo's queues start as random unit vectors: easy negatives, so
over the first ``queue_size`` steps the loss starts low and rises while real keys replace them, hiding any
learning in short runs. The trainer fills the queues (and the statistics) with real keys before the first
step. (With batch size 1 the queue spans ``queue_size`` steps; keys much older than the momentum copy's
horizon ``1 / (1 - momentum)`` become stale, i.e. separable from fresh keys whatever the image; the default
queue 256 with momentum 0.99 stays near that limit.)
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from vspa.translation.generator import AttentionDecoder, Encoder, Translator, init_weights
from vspa.utils import VspaError

LAYER_WEIGHTS = (0.1, 0.4, 0.7, 1.0)


# --------------------------------------------------------------------------- views and patches


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(p: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < p


def augment(image: torch.Tensor, generator: torch.Generator | None = None, min_area: float = 0.6) -> torch.Tensor:
    """One random view of ``image`` [3, H, W] in [0, 1], same size: crop (>= ``min_area`` of the area,
    aspect within 3/4..4/3 of the image's) resized back, flip p 0.5, colour jitter 0.4/0.4/0.4/0.1 p 0.8,
    grayscale p 0.2, gaussian blur sigma 0.1-2 p 0.5."""
    _, height, width = image.shape
    area = _uniform(min_area, 1.0, generator) * height * width
    ratio = math.exp(_uniform(math.log(3 / 4), math.log(4 / 3), generator)) * width / height
    crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
    crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    view = image[:, top : top + crop_h, left : left + crop_w]
    view = F.interpolate(view[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if _chance(0.5, generator):
        view = view.flip(-1)
    if _chance(0.8, generator):
        view = TF.adjust_brightness(view, _uniform(0.6, 1.4, generator))
        view = TF.adjust_contrast(view, _uniform(0.6, 1.4, generator))
        view = TF.adjust_saturation(view, _uniform(0.6, 1.4, generator))
        view = TF.adjust_hue(view, _uniform(-0.1, 0.1, generator))
    if _chance(0.2, generator):
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if _chance(0.5, generator):
        sigma = _uniform(0.1, 2.0, generator)
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((min(height, width) - 1) // 2) + 1)
        view = TF.gaussian_blur(view, [kernel, kernel], [sigma, sigma])
    return view.clamp(0.0, 1.0)


def two_views(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmentations of each image of a batch in [-1, 1] (returned in [-1, 1])."""
    x01 = (x.detach() + 1) / 2
    v1 = torch.stack([augment(img, generator) for img in x01])
    v2 = torch.stack([augment(img, generator) for img in x01])
    return v1 * 2 - 1, v2 * 2 - 1


def grid_patches(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B * grid^2, C, H / grid, W / grid]``, patches of one image consecutive, row-major."""
    b, c, h, w = x.shape
    if h % grid or w % grid:
        raise VspaError(
            f"local-global loss: a {h}x{w} view does not split into a {grid}x{grid} grid; "
            f"use crop sizes that are multiples of {4 * grid}."
        )
    x = x.view(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * grid * grid, c, h // grid, w // grid)


def branch_features(encoder: Encoder, attention: AttentionDecoder, x: torch.Tensor) -> list[torch.Tensor]:
    """The 4 supervised layers for input ``x``, globally average-pooled: ``[B, C_i]`` each."""
    h = encoder(x)
    _, feats = attention(h, return_features=True)
    return [f.mean(dim=(2, 3)) for f in [h, *feats]]


# --------------------------------------------------------------------------- heads and loss


STATS_MOMENTUM = 0.01  # running statistics: cumulative average over the first 100 updates, then an EMA


class RunningStandardize(nn.Module):
    """Per-channel standardisation ``(f - mean) / sqrt(var + eps)`` of pooled features ``[N, C]`` by running
    statistics (detached: the gradient reaches ``f`` only). :meth:`update` folds a batch into the mean and the
    second moment at rate ``max(1 / updates, momentum)``, so the variance is the spread over the recent
    batches (images), not only within one batch (with batch size 1, one image)."""

    def __init__(self, channels: int, momentum: float = STATS_MOMENTUM, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("sq_mean", torch.ones(channels))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> None:
        f = f.detach().float()
        self.updates += 1
        rate = max(1.0 / float(self.updates), self.momentum)
        self.mean.lerp_(f.mean(dim=0), rate)
        self.sq_mean.lerp_(f.pow(2).mean(dim=0), rate)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        var = (self.sq_mean - self.mean.pow(2)).clamp_min(0.0)
        return (f - self.mean) / torch.sqrt(var + self.eps)


def _mlp(c_in: int, hidden: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class LocalGlobalHeads(nn.Module):
    """Per layer: a global head (C -> hidden -> dim) and a local head (grid^2 C -> hidden -> dim)."""

    def __init__(self, channels: Sequence[int], grid: int, hidden: int, dim: int):
        super().__init__()
        self.grid = grid
        self.global_heads = nn.ModuleList(_mlp(c, hidden, dim) for c in channels)
        self.local_heads = nn.ModuleList(_mlp(grid * grid * c, hidden, dim) for c in channels)
        init_weights(self, gain=1.0)

    def forward(self, whole: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]):
        """L2-normalised global and local embeddings: two lists of ``[B, dim]``, from the (standardised) pooled
        features of the views (``[B, C_i]``) and of their patches (``[B * grid^2, C_i]``, one image's
        consecutive)."""
        b = whole[0].shape[0]
        g = [F.normalize(head(f), dim=1) for head, f in zip(self.global_heads, whole)]
        l = [F.normalize(head(f.reshape(b, -1)), dim=1) for head, f in zip(self.local_heads, parts)]
        return g, l


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo InfoNCE: positive ``q . k``, negatives ``q . queue``; mean cross-entropy with target 0."""
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class LocalGlobalLoss(nn.Module):
    """``L_GA`` for a translator with attention. Holds the heads, the momentum copy, the running feature
    statistics and the queues; the online E and G_A stay in the translator and are passed to ``forward`` /
    ``momentum_update``."""

    def __init__(
        self,
        generator: Translator,
        grid: int = 4,
        hidden: int = 256,
        dim: int = 128,
        queue_size: int = 4096,
        momentum: float = 0.999,
        tau: float = 0.2,
        weights: Sequence[float] = LAYER_WEIGHTS,
    ):
        super().__init__()
        if not generator.cfg.attention:
            raise VspaError("translate: the local-global loss needs the attention decoder (variant attention_lg).")
        if not 0.0 <= momentum < 1.0:
            raise VspaError(f"translate: momentum must be in [0, 1), got {momentum}.")
        if queue_size < 1:
            raise VspaError(f"translate: queue_size must be positive, got {queue_size}.")
        channels = [generator.encoder.out_channels, *generator.attention.feature_channels]
        if len(weights) != len(channels):
            raise VspaError(f"local-global loss: {len(weights)} layer weights for {len(channels)} layers.")
        self.grid = grid
        self.weights = list(weights)
        self.momentum = momentum
        self.tau = tau
        self.whole_stats = nn.ModuleList(RunningStandardize(c) for c in channels)
        self.patch_stats = nn.ModuleList(RunningStandardize(c) for c in channels)
        self.heads = LocalGlobalHeads(channels, grid, hidden, dim)
        self.momentum_encoder = copy.deepcopy(generator.encoder).requires_grad_(False)
        self.momentum_attention = copy.deepcopy(generator.attention).requires_grad_(False)
        self.momentum_heads = copy.deepcopy(self.heads).requires_grad_(False)
        n = len(channels)
        self.register_buffer("queue_global", F.normalize(torch.randn(n, queue_size, dim), dim=2))
        self.register_buffer("queue_local", F.normalize(torch.randn(n, queue_size, dim), dim=2))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _pairs(self, generator: Translator):
        """(online, momentum) module pairs, in a fixed order."""
        return [
            (generator.encoder, self.momentum_encoder),
            (generator.attention, self.momentum_attention),
            (self.heads, self.momentum_heads),
        ]

    @torch.no_grad()
    def momentum_update(self, generator: Translator) -> None:
        """``theta_m <- m theta_m + (1 - m) theta`` for E, G_A and the heads."""
        for online, ema in self._pairs(generator):
            for p, p_m in zip(online.parameters(), ema.parameters()):
                p_m.mul_(self.momentum).add_(p.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys_global: list[torch.Tensor], keys_local: list[torch.Tensor]) -> None:
        size = self.queue_global.shape[1]
        b = keys_global[0].shape[0]
        idx = (self.queue_ptr + torch.arange(b, device=self.queue_ptr.device)) % size
        for i, (kg, kl) in enumerate(zip(keys_global, keys_local)):
            self.queue_global[i, idx] = kg
            self.queue_local[i, idx] = kl
        self.queue_ptr.copy_((self.queue_ptr + b) % size)

    def pooled(self, encoder: Encoder, attention: AttentionDecoder, view: torch.Tensor):
        """Pooled features of ``view`` ``[B, 3, H, W]`` and of its grid patches at the 4 layers (unstandardised)."""
        return branch_features(encoder, attention, view), branch_features(
            encoder, attention, grid_patches(view, self.grid)
        )

    def standardise(self, whole: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]):
        return ([s(f) for s, f in zip(self.whole_stats, whole)], [s(f) for s, f in zip(self.patch_stats, parts)])

    def embed(self, generator: Translator, view: torch.Tensor, momentum: bool = False):
        """Global and local embeddings of ``view`` (online branch, or the momentum copy with ``momentum``) with
        the current statistics, which it leaves unchanged: for diagnostics and tests."""
        if momentum:
            with torch.no_grad():
                return self.momentum_heads(
                    *self.standardise(*self.pooled(self.momentum_encoder, self.momentum_attention, view))
                )
        return self.heads(*self.standardise(*self.pooled(generator.encoder, generator.attention, view)))

    @torch.no_grad()
    def prime(self, generator: Translator, batches, generator_rng: torch.Generator | None = None) -> int:
        """Before the first step: fill the queues with momentum keys of real views, and the running statistics
        with both views' features, from ``batches`` (an iterable of target batches in [-1, 1]); stops when the
        queue is full. Without it the first ``queue_size`` steps contrast against random unit vectors (easy
        negatives: the loss starts low and rises while they are replaced) and standardise by the statistics
        of a single image. Returns the number of keys queued."""
        size, queued, keys = self.queue_global.shape[1], 0, []
        for x in batches:
            if queued >= size:
                break
            v1, v2 = two_views(x, generator_rng)
            feats = [self.pooled(self.momentum_encoder, self.momentum_attention, v) for v in (v1, v2)]
            for i, stats in enumerate(self.whole_stats):
                stats.update(torch.cat([f[0][i] for f in feats]))
            for i, stats in enumerate(self.patch_stats):
                stats.update(torch.cat([f[1][i] for f in feats]))
            keys.append(feats[1])
            queued += x.shape[0]
        for whole, parts in keys:  # the keys with the statistics of all the batches
            self._enqueue(*self.momentum_heads(*self.standardise(whole, parts)))
        return min(queued, size)

    def forward(self, generator: Translator, x: torch.Tensor, generator_rng: torch.Generator | None = None):
        """``(L_GA, {"gg", "lg", "ll"} weighted terms)`` for target images ``x`` in [-1, 1].

        As in MoCo, the momentum copy is updated before the keys are computed, and the keys are queued after
        the loss: call once per training step. In training mode the running statistics take in this batch's
        features (both branches) before they standardise them. The views' random draws come from
        ``generator_rng`` (the trainer passes a per-iteration generator; ``None``: the global RNG).
        """
        v1, v2 = two_views(x, generator_rng)
        self.momentum_update(generator)
        with torch.no_grad():
            whole_k, parts_k = self.pooled(self.momentum_encoder, self.momentum_attention, v2)
        whole_q, parts_q = self.pooled(generator.encoder, generator.attention, v1)
        if self.training:
            for stats, fq, fk in zip(self.whole_stats, whole_q, whole_k):
                stats.update(torch.cat([fq, fk]))
            for stats, fq, fk in zip(self.patch_stats, parts_q, parts_k):
                stats.update(torch.cat([fq, fk]))
        with torch.no_grad():
            kg, kl = self.momentum_heads(*self.standardise(whole_k, parts_k))
        qg, ql = self.heads(*self.standardise(whole_q, parts_q))
        terms = {"gg": 0.0, "lg": 0.0, "ll": 0.0}
        for i, w in enumerate(self.weights):
            terms["gg"] = terms["gg"] + w * info_nce(qg[i], kg[i], self.queue_global[i].clone(), self.tau)
            terms["lg"] = terms["lg"] + w * info_nce(ql[i], kg[i], self.queue_global[i].clone(), self.tau)
            terms["ll"] = terms["ll"] + w * info_nce(ql[i], kl[i], self.queue_local[i].clone(), self.tau)
        self._enqueue(kg, kl)
        loss = terms["gg"] + terms["lg"] + terms["ll"]
        return loss, {k: float(v.detach()) for k, v in terms.items()}
