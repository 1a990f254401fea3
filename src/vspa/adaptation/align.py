"""Foreground and background alignment (method spec section 5) and the variants of the paper's ablations.

Foreground (``fg_mode``): each target instance embedding ``a`` (student box head on the student's map, with
gradient) is paired with a positive ``p`` and a negative ``n`` and trained with the cosine-weighted triplet
loss (:func:`vspa.adaptation.losses.cosine_triplet_loss`):

- ``memory``: ``p`` = the most cosine-similar entry of the same class in the foreground memory; with
  ``top_k = k > 1`` the anchor is paired with each of its ``k`` nearest entries (the paper's top-k
  sensitivity study). ``n`` (``fg_negative``): ``random``, a random memory entry of another class (the
  paper), or a random background-memory entry when the label space has a single class; ``hard``, the most
  similar memory entry of another class (the most similar background entry with a single class); ``both``,
  two triplets per anchor, one with each.
- ``inbatch_c2c``: ``p`` = the most similar source instance of the same class in the current source batch
  (ground-truth boxes, features detached like the memory's); anchors whose class is absent from the batch
  are skipped. ``n`` = a random in-batch source instance of another class, or a random in-batch source
  background when there is none.
- ``inbatch_agnostic``: ``p`` = the most similar in-batch source instance of any class; ``n`` = a random
  in-batch source background.
- ``prototype``: ``p`` = the class prototype (normalised mean of the class's normalised memory entries);
  ``n`` = the prototype of a random other class, or a random background-memory entry with one class.
- ``pairing``: ``p`` = the source version of the same object with controlled appearance differences (the
  AugSim -> FoggyAugSim experiment); built by :func:`vspa.adaptation.pairing.pairing_triplets` from a
  :class:`~vspa.adaptation.pairing.PairingBank`, which the trainer holds; ``n`` as in ``memory``.
- ``off``: no foreground loss.

Background (``bg_mode``): ``memory`` pairs each target background embedding with its most similar
background-memory entry and trains a binary discriminator through gradient reversal (source = the
retrieved memory entries, target = the live features); ``off`` disables it. Both sides are L2-normalised
before the discriminator (the memory is compared by cosine; raw norms would give the domains away).
``input_scale`` multiplies both sides after the normalisation: 1 is the paper's form, whose unit vectors
have components of about ``1/sqrt(D)`` (0.03 for D = 1024): a default-initialised MLP's logits stay near 0 for
about 200 SGD steps, longer than the 150 iterations between two memory refreshes of the embedded benchmark.
The trainer's ``bg_form: scaled`` and ``confusion`` multiply by ``bg_scale`` (default 4); ``sqrt(D)`` = 32
(components of about 1) makes each SGD step of the first layer ``32^2`` times larger than at scale 1 and the
discriminator overconfident, with loss spikes when the features move. ``confusion`` replaces the gradient
reversal: the discriminator learns on detached features, and the target features get the gradient of a
domain-confusion loss, ``BCE(D(f), 1/2)`` through the frozen discriminator (Tzeng et al. 2015), which pulls
the logit towards 0 with a gradient ``sigmoid(z) - 1/2`` that does not vanish when the discriminator is
confident; the reversed gradient ``-(sigmoid(z) - y)`` does.

Every random draw takes an explicit CPU ``torch.Generator`` so a run is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vspa.adaptation.losses import adversarial_terms, cosine_triplet_loss
from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank
from vspa.utils import VspaError

FG_MODES = ("memory", "inbatch_c2c", "inbatch_agnostic", "prototype", "pairing", "off")
BG_MODES = ("memory", "off")
FG_NEGATIVES = ("random", "hard", "both")


@dataclass
class Triplets:
    """Rows of (anchor, positive, negative) for the triplet loss; ``anchor`` carries the gradient."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def loss(self, margin: float) -> torch.Tensor:
        return cosine_triplet_loss(self.anchor, self.positive, self.negative, margin)


@dataclass
class SourceInstances:
    """In-batch source features for the ``inbatch_*`` modes (detached): instances and per-image backgrounds."""

    features: torch.Tensor  # [S, D]
    labels: torch.Tensor  # [S]
    background: torch.Tensor  # [B, D]


def _uniform_index(n: int, count: int, generator: torch.Generator, device) -> torch.Tensor:
    """``count`` uniform draws from ``range(n)`` (CPU generator, result on ``device``)."""
    u = torch.rand(count, generator=generator)
    return (u * n).long().clamp_max(n - 1).to(device)


def class_prototypes(bank: MemoryBank, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[C, D]`` unit vectors: the normalised mean of each class's normalised foreground entries."""
    feats = F.normalize(torch.as_tensor(np.asarray(bank.fg_features), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(bank.fg_labels), dtype=torch.long)
    sums = torch.zeros(bank.num_classes, feats.shape[1]).index_add_(0, labels - 1, feats)
    return F.normalize(sums, dim=1).to(device)


def _negative_vectors(retriever: Retriever, idx: torch.Tensor) -> torch.Tensor:
    return retriever.bg_vectors(idx) if retriever.negatives_from_background else retriever.fg_vectors(idx)


def memory_triplets(
    retriever: Retriever,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    top_k: int,
    generator: torch.Generator,
    negative: str = "random",
) -> Triplets:
    """``fg_mode: memory``: top-k same-class positives; ``negative`` (``random`` | ``hard`` | ``both``) picks
    a random other-class entry, the most similar other-class entry (background entries with one class), or
    one triplet with each (the random triplets first)."""
    if negative not in FG_NEGATIVES:
        raise VspaError(
            f"params.yaml: adapt.fg_negative '{negative}' is unknown. Use one of: {', '.join(FG_NEGATIVES)}."
        )
    idx, _ = retriever.topk(anchors, labels, k=top_k)  # [K, k], best first
    positive = retriever.fg_vectors(idx.reshape(-1))
    labels_rep = labels.repeat_interleave(top_k)
    anchors_rep = anchors.repeat_interleave(top_k, dim=0)
    parts = []
    if negative in ("random", "both"):
        parts.append(_negative_vectors(retriever, retriever.random_negative(labels_rep, generator)))
    if negative in ("hard", "both"):
        parts.append(_negative_vectors(retriever, retriever.hard_negative(anchors_rep, labels_rep)))
    device = anchors.device
    return Triplets(
        anchors_rep.repeat(len(parts), 1),
        positive.to(device).repeat(len(parts), 1),
        torch.cat(parts).to(device),
    )


def prototype_triplets(
    prototypes: torch.Tensor,
    retriever: Retriever,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> Triplets:
    """``fg_mode: prototype``: positive = own class prototype, negative = another class's prototype
    (or a random background-memory entry when there is one class)."""
    num_classes = prototypes.shape[0]
    device = anchors.device
    positive = prototypes[labels - 1].to(device)
    if num_classes < 2:
        negative = retriever.bg_vectors(_uniform_index(len(retriever.bg), len(labels), generator, "cpu"))
    else:
        shift = 1 + _uniform_index(num_classes - 1, len(labels), generator, labels.device)
        negative = prototypes[(labels - 1 + shift) % num_classes]
    return Triplets(anchors, positive, negative.to(device))


def inbatch_triplets(
    source: SourceInstances,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    class_aware: bool,
) -> Triplets:
    """``fg_mode: inbatch_c2c`` (``class_aware``) or ``inbatch_agnostic``: positives from the source batch."""
    device = anchors.device
    empty = Triplets(anchors[:0], anchors.new_zeros((0, anchors.shape[1])), anchors.new_zeros((0, anchors.shape[1])))
    if len(source.features) == 0 or len(anchors) == 0:
        return empty
    src = F.normalize(source.features.detach().to(device), dim=1)
    src_labels = source.labels.to(device)
    sims = F.normalize(anchors.detach(), dim=1) @ src.T  # [K, S]
    if class_aware:
        same = labels[:, None] == src_labels[None, :]
        sims = sims.masked_fill(~same, float("-inf"))
        keep = same.any(dim=1)
    else:
        keep = torch.ones(len(anchors), dtype=torch.bool, device=device)
    if not keep.any():
        return empty
    anchors, labels, sims = anchors[keep], labels[keep], sims[keep]
    positive = src[sims.argmax(dim=1)]
    background = F.normalize(source.background.detach().to(device), dim=1)
    negative = background[_uniform_index(len(background), len(anchors), generator, device)]
    if class_aware:
        # a random source instance of another class where the batch has one, else the background drawn above
        other = labels[:, None] != src_labels[None, :]  # [K, S]
        counts = other.sum(dim=1)
        u = torch.rand(len(anchors), generator=generator).to(device)
        pick = (u * counts).long().clamp_max((counts - 1).clamp_min(0))  # which of the "other" entries
        column = (other.cumsum(dim=1) <= pick[:, None]).sum(dim=1).clamp_max(len(src) - 1)
        has_other = counts > 0
        negative = torch.where(has_other[:, None], src[column], negative)
    return Triplets(anchors, positive, negative)


def background_loss(
    discriminator: torch.nn.Module,
    retriever: Retriever,
    target_background: torch.Tensor,
    grl_coeff: float = 1.0,
    input_scale: float = 1.0,
    confusion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``bg_mode: memory``: adversarial loss between target backgrounds and their nearest memory backgrounds.

    ``grl_coeff`` scales the gradient that reaches ``target_background`` (reversed discriminator gradient, or
    with ``confusion`` the confusion loss's weight); ``input_scale`` multiplies the unit vectors the
    discriminator sees. Returns ``(loss to minimise, the discriminator's own loss (detached; 2 ln 2 at
    chance), its balanced accuracy on this batch)``."""
    if len(target_background) == 0:
        zero = target_background.sum() * 0.0
        return zero, zero.detach(), float("nan")
    idx, _ = retriever.topk_background(target_background, k=1)
    source = retriever.bg_vectors(idx[:, 0]).to(target_background.device) * input_scale
    target = F.normalize(target_background, dim=1) * input_scale
    if not confusion:
        loss, accuracy = adversarial_terms(discriminator, source, target, grl_coeff)
        return loss, loss.detach(), accuracy
    disc_loss, accuracy = adversarial_terms(discriminator, source, target.detach())  # trains the discriminator
    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    logits = torch.func.functional_call(discriminator, frozen, (target,))  # trains the features only
    confusion_loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))
    return disc_loss + grl_coeff * confusion_loss, disc_loss.detach(), accuracy


class ForegroundAligner:
    """Builds the triplets of one iteration for the configured ``fg_mode``."""

    def __init__(self, fg_mode: str, top_k: int = 1, margin: float = 1.5, negative: str = "random"):
        if fg_mode not in FG_MODES:
            raise VspaError(f"params.yaml: adapt.fg_mode '{fg_mode}' is unknown. Use one of: {', '.join(FG_MODES)}.")
        if top_k < 1:
            raise VspaError(f"params.yaml: adapt.top_k must be >= 1, got {top_k}.")
        if margin < 0:
            raise VspaError(f"params.yaml: adapt.margin must be >= 0, got {margin}.")
        if negative not in FG_NEGATIVES:
            raise VspaError(
                f"params.yaml: adapt.fg_negative '{negative}' is unknown. Use one of: {', '.join(FG_NEGATIVES)}."
            )
        self.negative = negative
        self.fg_mode = fg_mode
        self.top_k = top_k
        self.margin = margin
        self.prototypes: torch.Tensor | None = None

    @property
    def needs_source_instances(self) -> bool:
        return self.fg_mode.startswith("inbatch")

    def set_memory(self, bank: MemoryBank, device) -> None:
        """Recompute what depends on the memory (the prototypes) after loading or refreshing it."""
        self.prototypes = class_prototypes(bank, device) if self.fg_mode == "prototype" else None

    def triplets(
        self,
        anchors: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        retriever: Retriever | None = None,
        source: SourceInstances | None = None,
    ) -> Triplets:
        if self.fg_mode == "memory":
            return memory_triplets(retriever, anchors, labels, self.top_k, generator, self.negative)
        if self.fg_mode == "prototype":
            return prototype_triplets(self.prototypes, retriever, anchors, labels, generator)
        if self.needs_source_instances:
            return inbatch_triplets(source, anchors, labels, generator, class_aware=self.fg_mode == "inbatch_c2c")
        if self.fg_mode == "pairing":
            raise ValueError("fg_mode 'pairing' builds its triplets with vspa.adaptation.pairing.pairing_triplets")
        raise ValueError("fg_mode 'off' builds no triplets")

    def loss(self, triplets: Triplets) -> torch.Tensor:
        return triplets.loss(self.margin)
