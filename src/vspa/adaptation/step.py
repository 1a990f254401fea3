"""One adaptation iteration's losses: :class:`StudentStep` (the student and the discriminators) and
:func:`student_detections`; the method is described in :mod:`vspa.adaptation.trainer`."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from vspa.adaptation.align import ForegroundAligner, SourceInstances, background_loss
from vspa.adaptation.config import AdaptConfig
from vspa.adaptation.losses import FeatureDiscriminator, ImageDiscriminator, adversarial_terms, triplet_stats
from vspa.adaptation.pairing import PairingBank, anchor_object_ids, pairing_triplets
from vspa.detection.model import LOSS_NAMES, Detector
from vspa.memory.retrieval import Retriever


@contextmanager
def _timer(device: torch.device, out: list[float]):
    """Appends the wall time of the block (synchronised on CUDA) to ``out``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out.append(time.perf_counter() - start)


@torch.no_grad()
def student_detections(detector: Detector, image_list, features: dict) -> list[dict]:
    """The student's own detections on an already computed (detached) feature map, in ``image_list``'s
    coordinates: its RPN and ROI heads run in eval mode (test-time proposal counts), no gradient."""
    model = detector.model
    modes = (model.rpn.training, model.roi_heads.training)
    model.rpn.eval()
    model.roi_heads.eval()
    try:
        detached = {k: v.detach() for k, v in features.items()}
        proposals, _ = model.rpn(image_list, detached)
        detections, _ = model.roi_heads(detached, proposals, image_list.image_sizes)
    finally:
        model.rpn.train(modes[0])
        model.roi_heads.train(modes[1])
    return detections


class StudentStep(nn.Module):
    """The student detector and the discriminators; ``forward`` computes every loss of one iteration.

    A single module so that DistributedDataParallel averages the gradients of all of them. The retriever
    and the foreground aligner are plain attributes set by the trainer (they hold no trainable state).
    """

    def __init__(self, detector: Detector, cfg: AdaptConfig):
        super().__init__()
        self.detector = detector
        self.cfg = cfg
        self.img_disc = ImageDiscriminator(detector.feature_channels, cfg.img_disc_width) if cfg.use_img else None
        self.bg_disc = FeatureDiscriminator(detector.embed_dim) if cfg.use_bg else None
        self.aligner = ForegroundAligner(cfg.fg_mode, cfg.top_k, cfg.margin, cfg.fg_negative)
        self.retriever: Retriever | None = None
        self.iteration = 0  # set by the trainer before each step (the background warm-up reads it)
        self.pairing_bank: PairingBank | None = None  # fg_mode pairing: the counterparts' features

    def forward(
        self,
        src_images: list[torch.Tensor],
        src_targets: list[dict],
        tgt_weak: list[torch.Tensor],
        tgt_strong: list[torch.Tensor],
        pseudo: list[dict],
        generator: torch.Generator,
        pair_targets: list[dict] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every loss of one iteration. ``src_images``: the weak source views, then (``source_strong``) their
        strong views; ``pseudo``: the teacher's pseudo-labels of the target images (weak-view coordinates,
        which the photometric strong view shares); ``pair_targets`` (``fg_mode: pairing`` only): the target
        images' weak-view ``boxes``, ``object_ids`` and ``flipped`` flag."""
        cfg, det = self.cfg, self.detector
        out: dict[str, torch.Tensor] = {}
        times: list[float] = []

        src_list, src_t = det.prepare(src_images, src_targets)
        src_feats = det.backbone_features(src_list)
        sup = det.supervised_losses(src_list, src_feats, src_t)
        out.update(sup)
        out["loss_sup"] = sum(sup[k] for k in LOSS_NAMES)
        terms = {"sup": out["loss_sup"]}
        nan = float("nan")
        diag = {"img_disc_acc": nan, "bg_disc_acc": nan, "fg_active": nan, "cos_ap": nan, "cos_an": nan}

        zero = out["loss_sup"].new_zeros(())
        if cfg.uses_target:
            tgt_list, tgt_t = det.prepare(tgt_strong, pseudo)
            tgt_feats = det.backbone_features(tgt_list)
            unsup = det.supervised_losses(tgt_list, tgt_feats, tgt_t)
            out["unsup_objectness"] = unsup["loss_objectness"]
            out["unsup_classifier"] = unsup["loss_classifier"]
            out["loss_unsup"] = unsup["loss_objectness"] + unsup["loss_classifier"]
        else:  # the fair source-only baseline: no target pass at all
            out["unsup_objectness"] = out["unsup_classifier"] = out["loss_unsup"] = zero
        terms["unsup"] = cfg.lambda_unsup * out["loss_unsup"]
        total = out["loss_sup"] + terms["unsup"]

        out["loss_img"] = out["loss_fg"] = out["loss_bg"] = zero
        out["fg_pairs"] = total.new_tensor(0.0)
        if not (cfg.use_img or cfg.use_fg or cfg.use_bg):
            out["time_align"] = zero
            out["total"] = total
            return self._with_diagnostics(out, terms, diag)

        n_weak = len(src_t) // 2 if cfg.source_strong else len(src_t)
        if cfg.align_view == "weak":  # the views the memory and the teacher see: no photometric augmentation
            al_list, al_t = det.prepare(tgt_weak, pseudo)
            al_feats = det.backbone_features(al_list)
            src_al_feats = {k: v[:n_weak] for k, v in src_feats.items()}
        else:
            al_list, al_t, al_feats, src_al_feats = tgt_list, tgt_t, tgt_feats, src_feats
        if self.img_disc is not None:
            key = next(iter(src_feats))
            weight, coeff = self._adversarial_weights(cfg.lambda_img)
            out["loss_img"], diag["img_disc_acc"] = adversarial_terms(
                self.img_disc, src_al_feats[key], al_feats[key], coeff
            )
            terms["img"] = weight * out["loss_img"]
            total = total + terms["img"]
        if cfg.use_fg or cfg.use_bg:
            # memory retrieval and the alignment losses in full precision, also under mixed precision (``amp``):
            # the memory is float32, and a nearest neighbour should not depend on a 16-bit rounding
            al_feats = {k: v.float() for k, v in al_feats.items()}
            with _timer(total.device, times), torch.autocast(total.device.type, enabled=False):
                source = None
                if cfg.use_fg and self.aligner.needs_source_instances:
                    source = self._source_instances(src_list, src_feats, src_t, n_weak)
                pairing = None
                if cfg.use_pairing:
                    pairing = (pair_targets, [tuple(im.shape[-2:]) for im in tgt_weak])
                out.update(self._alignment_losses(al_list, al_feats, al_t, source, generator, pairing, diag))
            bg_weight = self._adversarial_weights(self._bg_lambda())[0]
            terms["fg"] = cfg.lambda_fg * out["loss_fg"]
            terms["bg"] = bg_weight * out.pop("_bg_total", out["loss_bg"])
            total = total + terms["fg"] + terms["bg"]
        out["time_align"] = total.new_tensor(times[0] if times else 0.0)
        out["total"] = total
        return self._with_diagnostics(out, terms, diag)

    def _with_diagnostics(self, out: dict, terms: dict, diag: dict) -> dict:
        """``out`` plus the per-iteration diagnostics (floats, see :mod:`vspa.adaptation.diagnostics`) as
        tensors and ``terms``: the weighted loss terms whose sum is ``out["total"]`` (for the gradient shares)."""
        ref = out["total"]
        for key, value in diag.items():
            out[key] = ref.new_tensor(value).detach()
        out["terms"] = terms
        return out

    def _bg_lambda(self) -> float:
        """lambda_bg, ramped linearly from 0 over ``bg_warmup`` iterations (not in ``bg_form: paper``)."""
        cfg = self.cfg
        if cfg.bg_form != "paper" and cfg.bg_warmup > 0:
            return cfg.lambda_bg * min(1.0, self.iteration / cfg.bg_warmup)
        return cfg.lambda_bg

    def _bg_input_scale(self) -> float:
        """The factor on the unit vectors the background discriminator sees (``bg_form``: paper 1, else bg_scale)."""
        return self.cfg.bg_scale if self.cfg.bg_form != "paper" else 1.0

    def _adversarial_weights(self, lam: float) -> tuple[float, float]:
        """(weight of the discriminator loss in the total, gradient-reversal coefficient) for weight ``lam``.

        Both give the detector the same reversed gradient, ``-lam * dL/dfeatures``. With ``disc_full_rate``
        the discriminator minimises its loss at the full learning rate (DANN's form: lambda is the reversal
        coefficient); otherwise its gradient is scaled by ``lam`` too (``lam * L`` through a unit reversal,
        as Adaptive Teacher writes it), which leaves it nearly untrained in a short run.
        """
        return (1.0, lam) if self.cfg.disc_full_rate else (lam, 1.0)

    def _alignment_losses(
        self, tgt_list, tgt_feats, tgt_t, source: SourceInstances | None, generator, pairing=None, diag=None
    ) -> dict:
        """Foreground triplet loss (with the number of triplets) and background adversarial loss, on the
        student's map ``tgt_feats`` of the target images. ``pairing`` (``fg_mode: pairing``): ``(pair_targets,
        original_sizes)``, the target images' weak-view ground truth and their sizes before resizing."""
        cfg, det = self.cfg, self.detector
        if cfg.fg_boxes == "student":
            dets = student_detections(det, tgt_list, tgt_feats)
            boxes = [d["boxes"][d["scores"] >= cfg.tau] for d in dets]
            labels = torch.cat([d["labels"][d["scores"] >= cfg.tau] for d in dets])
        else:
            boxes = [t["boxes"] for t in tgt_t]
            labels = torch.cat([t["labels"] for t in tgt_t])
        out = {}
        if cfg.use_fg:
            anchors = det.embed(det.pool(tgt_feats, boxes, tgt_list.image_sizes))
            if cfg.fg_mode == "pairing":
                triplets = self._pairing_triplets(anchors, labels, boxes, tgt_list.image_sizes, pairing, generator)
            else:
                triplets = self.aligner.triplets(anchors, labels, generator, self.retriever, source)
            out["loss_fg"] = self.aligner.loss(triplets) if len(triplets.anchor) else anchors.sum() * 0.0
            out["fg_pairs"] = anchors.new_tensor(float(len(triplets.anchor)))
            if diag is not None:
                stats = triplet_stats(triplets.anchor, triplets.positive, triplets.negative, cfg.margin)
                diag.update(fg_active=stats["active"], cos_ap=stats["cos_ap"], cos_an=stats["cos_an"])
        if cfg.use_bg:
            target_bg = det.embed(det.pool_background(tgt_feats, boxes, tgt_list.image_sizes))
            out["_bg_total"], out["loss_bg"], accuracy = background_loss(
                self.bg_disc,
                self.retriever,
                target_bg,
                self._adversarial_weights(self._bg_lambda())[1],
                self._bg_input_scale(),
                confusion=cfg.bg_form == "confusion",
            )
            if diag is not None:
                diag["bg_disc_acc"] = accuracy
        return out

    def _pairing_triplets(self, anchors, labels, boxes, image_sizes, pairing, generator):
        """``fg_mode: pairing``: match the anchors to the target objects, pair each with its counterpart."""
        if self.pairing_bank is None or pairing is None or pairing[0] is None:
            raise RuntimeError("fg_mode pairing: the trainer sets pairing_bank and passes pair_targets")
        pair_targets, original_sizes = pairing
        object_ids, mirrored = anchor_object_ids(boxes, pair_targets, original_sizes, list(image_sizes))
        return pairing_triplets(self.pairing_bank, self.retriever, anchors, labels, object_ids, mirrored, generator)

    def _source_instances(self, src_list, src_feats: dict, src_t: list[dict], n: int) -> SourceInstances:
        """In-batch source instances (ground-truth boxes of the ``n`` weak views) and backgrounds, detached."""
        feats = {k: v[:n].detach().float() for k, v in src_feats.items()}
        sizes = src_list.image_sizes[:n]
        boxes = [t["boxes"] for t in src_t[:n]]
        with torch.no_grad():
            instances = self.detector.embed(self.detector.pool(feats, boxes, sizes))
            background = self.detector.embed(self.detector.pool_background(feats, boxes, sizes))
        return SourceInstances(instances, torch.cat([t["labels"] for t in src_t[:n]]), background)
