"""Adaptation training: a mean teacher (Adaptive Teacher) with memory-based foreground/background alignment.

One iteration (method spec section 5):

1. a global batch of labelled source images and of unlabelled target images (``batch_size`` each, split
   over the processes); every image gets the weak augmentation (flip), and a strong (photometric) view of it;
2. the teacher (EMA of the student, eval mode, no gradient) detects on the weak target views; detections
   with score >= ``tau`` are the pseudo-labels;
3. the student's losses: supervised on the source weak + strong views (all four Faster R-CNN losses);
   unsupervised on the strong target views with the pseudo-labels (RPN objectness + ROI classification, no
   box regression) x ``lambda_unsup``; image-level adversarial loss (discriminator on the backbone map,
   gradient reversal) weighted by ``lambda_img``; foreground triplet loss x ``lambda_fg``; background
   adversarial loss weighted by ``lambda_bg`` (see :mod:`vspa.adaptation.align`);
4. one SGD step for the student and the discriminators, then the EMA update of the teacher;
5. every ``refresh_every`` iterations the memory is extracted again from the source split with the current
   student (or teacher) and subsampled again with the method and ratios recorded in the memory file.
   Rank 0 builds it and writes it, the other processes read the same file after a barrier.

Determinism: every random draw of iteration ``k`` comes from generators seeded by ``(seed, k, ...)``
(:func:`vspa.detection.train.derive_seed`), so the state at a checkpoint is a function of the iteration, and
a run killed and resumed from its last checkpoint gives bit-identical weights on the CPU.

Alignment view (``align_view``). With ``weak`` (default) the image discriminator compares the weak source
views with the weak target views, as Adaptive Teacher does, and the foreground / background target features
come from the student's map of the weak target views: the views the teacher labelled and, like the memory
(extracted without augmentation), free of photometric augmentation, so a discriminator cannot tell the
domains apart by the augmentation alone. It costs one more student backbone pass over the target images.
``strong`` reuses the maps of the supervised / unsupervised passes instead. For both adversarial terms the
detector receives ``-lambda`` times the gradient of the discriminator's loss; by default
(``disc_full_rate``) the discriminators themselves learn at the full learning rate (see
:meth:`StudentStep._adversarial_weights`).

Controlled pairs (``fg_mode: pairing``, the visual-similarity experiment of paper 3.2 with AugSim as the
source and FoggyAugSim as the target; :mod:`vspa.adaptation.pairing`). The positive of a target instance is
not retrieved but the source version of the same object whose appearance differs in exactly the attributes
``pairing_mode`` names (``exact``: none, ``color``, ``flip``, ``color_flip``). Before training, a
:class:`~vspa.adaptation.pairing.PairingBank` of those counterparts is embedded with the student (the pair
table comes from ``pairing_original``, ``pairing_variants`` and the target split); it is embedded again at
every memory refresh with the refresh model and is part of the resumable state. The anchors are the same
target instances as in ``fg_mode: memory`` (detections with score >= ``tau``); each is matched to a
ground-truth object of its (weak-view) target image by IoU >= 0.5, so this mode reads the target's boxes and
object ids (never its labels), and anchors matching no object are dropped. The weak view's mirror flag
selects the counterpart of the mirrored object. Negatives are drawn from the usual memory as in
``fg_mode: memory``, so the mode needs the memory file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vspa.adaptation import diagnostics
from vspa.adaptation.align import (
    BG_MODES,
    FG_MODES,
    FG_NEGATIVES,
    ForegroundAligner,
    SourceInstances,
    background_loss,
)
from vspa.adaptation.losses import FeatureDiscriminator, ImageDiscriminator, adversarial_terms, triplet_stats
from vspa.adaptation.pairing import PAIRING_MODES, PairingBank, PairTable, anchor_object_ids, pairing_triplets
from vspa.adaptation.pseudo import filter_pseudo_labels
from vspa.adaptation.teacher import ema_update, make_teacher, teacher_detect
from vspa.detection import checkpoint as detector_checkpoint
from vspa.detection import distributed
from vspa.detection.model import LOSS_NAMES, Detector
from vspa.detection.train import WARMUP_FACTOR, derive_seed, global_batch
from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank, open_memory
from vspa.training.precision import Precision
from vspa.utils import (
    VspaError,
    rng_state,
    save_torch_atomic,
    set_rng_state,
    sha256_file,
    sha256_json,
    write_text_atomic,
)

STATE_FORMAT = "vspa-adapt-state/1"
FG_BOXES = ("teacher", "student")
ALIGN_VIEWS = ("weak", "strong")
REFRESH_MODELS = ("student", "teacher")
BG_FORMS = ("paper", "scaled", "confusion")
CSV_COLUMNS = (
    "iteration",
    "lr",
    *LOSS_NAMES,
    "loss_sup",
    "unsup_objectness",
    "unsup_classifier",
    "loss_unsup",
    "loss_img",
    "loss_fg",
    "loss_bg",
    "total",
    "pseudo_per_image",
    "fg_pairs",
    "time_iter",
    "time_align",
)
# random streams drawn from (seed, iteration, ...)
_SRC_ORDER, _TGT_ORDER, _SRC_AUG, _TGT_AUG, _SAMPLER, _ALIGN = 10, 11, 12, 13, 14, 15


@dataclass
class AdaptConfig:
    """The ``adapt`` params section (with a per-run override section merged over it)."""

    iterations: int
    batch_size: int  # source images and target images per iteration (global, split over the processes)
    lr: float
    seed: int = 0
    device: str = "auto"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 0
    ema_keep: float = 0.999
    tau: float = 0.8
    lambda_unsup: float = 1.0
    lambda_img: float = 0.1
    lambda_fg: float = 0.05
    lambda_bg: float = 0.05
    fg_mode: str = "memory"  # memory | inbatch_c2c | inbatch_agnostic | prototype | pairing | off
    bg_mode: str = "memory"  # memory | off
    fg_boxes: str = "teacher"  # whose detections (score >= tau) give the target instances: teacher | student
    # fg_mode memory: the triplet's negative: random (paper) | hard (nearest other-class entry) | both (one of each)
    fg_negative: str = "both"
    top_k: int = 1
    margin: float = 1.5
    # paper: unit vectors into the discriminator, gradient reversal | scaled: inputs x bg_scale, reversal |
    # confusion: inputs x bg_scale, discriminator on detached features, confusion loss for the features
    bg_form: str = "scaled"
    bg_scale: float = 4.0  # scaled / confusion: factor on the unit vectors the background discriminator sees
    bg_warmup: int = 0  # scaled / confusion: the features' gradient ramps from 0 to lambda_bg over these iterations
    diag_every: int = 25  # gradient share of each loss term every N iterations (0 = never)
    disc_full_rate: bool = True  # discriminators learn at the full rate; lambda scales the reversed gradient
    img_disc_width: int = 64
    source_strong: bool = True  # supervised loss also on the strong source view (Adaptive Teacher)
    align_view: str = "weak"  # target view of the discriminators and the fg/bg features: weak | strong
    refresh_every: int = 0  # 0: never refresh the memory
    refresh_model: str = "student"  # student | teacher
    checkpoint_every: int = 50
    # also keep the teacher every N iterations as work_dir/teacher_<N>.pt (0 = never): for choosing the iteration
    # budget on target validation from one run (benchmarks/bench_rows.py evaluates them); recorded only when on
    snapshot_every: int = 0
    amp: bool = False  # mixed precision (autocast + gradient scaling; for CUDA): vspa.training.precision
    # fg_mode pairing only (the AugSim -> FoggyAugSim experiment; see vspa.adaptation.pairing)
    pairing_mode: str = "exact"  # exact | color | flip | color_flip: what a target object's positive differs in
    pairing_original: str = ""  # the original source split folder (every object as it is, variant "none")
    pairing_variants: str = ""  # the folder of the variant sets color/, flip/, color_flip/ (stage augsim)

    @classmethod
    def from_params(cls, section: dict, name: str = "adapt", path: str = "params.yaml") -> "AdaptConfig":
        """Build from an effective params section (``null`` = default); VspaError on unknown keys or bad values."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise VspaError(
                f"{path}: unknown key(s) in section '{name}:': {', '.join(unknown)}. Known: {', '.join(sorted(names))}."
            )
        values = {k: v for k, v in section.items() if v is not None}
        for key in ("iterations", "batch_size", "lr"):
            if key not in values:
                raise VspaError(f"{path}: {name}.{key} is not set (null and not in the scenario preset). Give a value.")
        try:
            cfg = cls(**values)
            for f in dataclasses.fields(cls):  # annotations are strings: "int", "float", "bool", "str"
                value = getattr(cfg, f.name)
                if f.type == "bool" and not isinstance(value, bool):
                    raise TypeError(f"{f.name} must be true or false, got {value!r}")
                setattr(cfg, f.name, {"int": int, "float": float, "bool": bool, "str": str}[f.type](value))
        except (TypeError, ValueError) as exc:
            raise VspaError(f"{path}: section '{name}:' has a value of the wrong type ({exc}).") from exc
        cfg.validate(name, path)
        return cfg

    def validate(self, name: str = "adapt", path: str = "params.yaml") -> None:
        checks = [
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (0 <= self.ema_keep <= 1, "ema_keep must be in [0, 1]"),
            (0 <= self.tau <= 1, "tau must be in [0, 1]"),
            (min(self.lambda_unsup, self.lambda_img, self.lambda_fg, self.lambda_bg) >= 0, "lambda_* must be >= 0"),
            (self.fg_mode in FG_MODES, f"fg_mode must be one of {', '.join(FG_MODES)}"),
            (self.bg_mode in BG_MODES, f"bg_mode must be one of {', '.join(BG_MODES)}"),
            (self.fg_boxes in FG_BOXES, f"fg_boxes must be one of {', '.join(FG_BOXES)}"),
            (self.fg_negative in FG_NEGATIVES, f"fg_negative must be one of {', '.join(FG_NEGATIVES)}"),
            (self.bg_form in BG_FORMS, f"bg_form must be one of {', '.join(BG_FORMS)}"),
            (self.bg_warmup >= 0, "bg_warmup must be >= 0"),
            (self.bg_scale > 0 and math.isfinite(self.bg_scale), "bg_scale must be a positive number"),
            (self.diag_every >= 0, "diag_every must be >= 0 (0 = never)"),
            (self.align_view in ALIGN_VIEWS, f"align_view must be one of {', '.join(ALIGN_VIEWS)}"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.margin >= 0, "margin must be >= 0"),
            (self.img_disc_width >= 1, "img_disc_width must be >= 1"),
            (self.refresh_every >= 0, "refresh_every must be >= 0 (0 = never)"),
            (self.refresh_model in REFRESH_MODELS, f"refresh_model must be one of {', '.join(REFRESH_MODELS)}"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.snapshot_every >= 0, "snapshot_every must be >= 0 (0 = never)"),
            (self.pairing_mode in PAIRING_MODES, f"pairing_mode must be one of {', '.join(PAIRING_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VspaError(f"{path}: {name}.{message}.")
        if self.use_pairing:
            for key, what in PAIRING_FOLDERS.items():
                if not getattr(self, key):
                    raise VspaError(
                        f"{path}: {name}.{key} is not set, but fg_mode pairing needs it: {what}. Set it (e.g. "
                        f"{PAIRING_EXAMPLES[key]}, written by `dvc repro augsim`) or choose another fg_mode."
                    )

    @property
    def use_fg(self) -> bool:
        return self.fg_mode != "off" and self.lambda_fg > 0

    @property
    def use_bg(self) -> bool:
        return self.bg_mode != "off" and self.lambda_bg > 0

    @property
    def use_img(self) -> bool:
        return self.lambda_img > 0

    @property
    def uses_target(self) -> bool:
        """False when no loss reads the target images (``lambda_unsup`` 0 and every alignment off): the fair
        source-only baseline (source weak + strong views, EMA teacher), which then skips the teacher and every
        target pass."""
        return self.lambda_unsup > 0 or self.use_img or self.use_fg or self.use_bg

    @property
    def use_pairing(self) -> bool:
        return self.use_fg and self.fg_mode == "pairing"

    @property
    def needs_memory(self) -> bool:  # pairing: the negatives come from the memory
        return (self.use_fg and self.fg_mode in ("memory", "prototype", "pairing")) or self.use_bg

    def record(self) -> dict:
        """The configuration as a plain dict; the ``pairing_*`` keys only with ``fg_mode: pairing`` (so the
        records and resume fingerprints of the other modes are what they were before that mode existed)."""
        out = dataclasses.asdict(self)
        for key in ("snapshot_every", "amp"):  # records of runs without them stay as they were
            if not out[key]:
                out.pop(key)
        if self.fg_mode != "pairing":
            out = {k: v for k, v in out.items() if not k.startswith("pairing_")}
        return out

    def lr_factor(self, iteration: int) -> float:
        """Constant learning rate after a linear warm-up (the paper: no decay)."""
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            return WARMUP_FACTOR * (1 - alpha) + alpha
        return 1.0


PAIRING_FOLDERS = {
    "pairing_original": "the original source split (each object as it is; the split AugSim was made from)",
    "pairing_variants": "the folder holding the variant sets color/, flip/ and color_flip/ of that split",
}
PAIRING_EXAMPLES = {"pairing_original": "data/benchmark/source_train", "pairing_variants": "data/augsim/pairing"}


@dataclass
class AdaptData:
    """The inputs of an adaptation run."""

    source: Any  # DetectionDataset of the labelled source split (also the memory's source on refresh)
    target: Any  # DetectionDataset of the unlabelled target split (its labels are never read)
    memory_path: Path | None  # the (subsampled) memory file; None when no memory loss is on
    fingerprint: dict  # what identifies the inputs (hashes), for resuming
    pairing_table: PairTable | None = None  # fg_mode pairing: the target objects' counterparts (build_pairing_table)


def build_pairing_table(
    cfg: AdaptConfig, target_dir: str | Path, name: str = "adapt", path: str = "params.yaml"
) -> PairTable:
    """The pair table of ``fg_mode: pairing`` from ``cfg.pairing_original``, ``cfg.pairing_variants`` and the
    target split folder; a missing folder raises ``VspaError`` naming the param and the fix."""
    for key, what in PAIRING_FOLDERS.items():
        folder = Path(getattr(cfg, key))
        if not getattr(cfg, key) or not folder.is_dir():
            raise VspaError(
                f"{path}: {name}.{key} = '{getattr(cfg, key)}' is not a folder; it must name {what} "
                f"(e.g. {PAIRING_EXAMPLES[key]}). Run `dvc repro augsim` or fix the path."
            )
    return PairTable.build(cfg.pairing_original, cfg.pairing_variants, target_dir)


def pairing_fingerprint(table: PairTable) -> dict:
    """Hashes of the pairing sets' annotation files (part of the resume fingerprint in ``fg_mode: pairing``)."""
    return {variant: sha256_file(folder / "annotations.json") for variant, folder in sorted(table.split_dirs.items())}


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


def _views(dataset, indices: list[int], positions: range, seed: int, iteration: int, stream: int, device):
    """Weak views (and their targets) and strong views of the items of one process's share of a batch, and
    the weak views' pairing ground truth (``boxes``, ``object_ids``, ``flipped``; on the CPU, read only by
    ``fg_mode: pairing``)."""
    from vspa.data import transforms

    weak, strong, targets, pairs = [], [], [], []
    for position in positions:
        image, target = dataset[indices[position]]
        g = torch.Generator().manual_seed(derive_seed(seed, iteration, position, stream))
        image, target = transforms.weak(image, target, g)
        weak.append(image.to(device))
        strong.append(transforms.strong(image, g).to(device))
        targets.append({"boxes": target["boxes"].to(device), "labels": target["labels"].to(device)})
        pairs.append({
            "boxes": target["boxes"],
            "labels": target["labels"],  # read only by the pseudo-label diagnostics, never by training
            "object_ids": target["object_ids"],
            "flipped": bool(target["flipped"]),
        })
    return weak, strong, targets, pairs


def _batch(data: AdaptData, cfg: AdaptConfig, iteration: int, positions: range, device):
    """This process's share of iteration ``iteration``'s batches: source images (weak views, then the strong
    views when ``source_strong``) with their targets, the weak and strong target views, and the target weak
    views' pairing ground truth (boxes, object ids, mirror flag; used only by ``fg_mode: pairing``)."""
    src_idx = global_batch(len(data.source), cfg.batch_size, derive_seed(cfg.seed, _SRC_ORDER), iteration)
    tgt_idx = global_batch(len(data.target), cfg.batch_size, derive_seed(cfg.seed, _TGT_ORDER), iteration)
    src_weak, src_strong, src_targets, _ = _views(
        data.source, src_idx, positions, cfg.seed, iteration, _SRC_AUG, device
    )
    tgt_weak, tgt_strong, tgt_pairs = [], [], []
    if cfg.uses_target:  # the fair source-only baseline reads no target image
        tgt_weak, tgt_strong, _, tgt_pairs = _views(
            data.target, tgt_idx, positions, cfg.seed, iteration, _TGT_AUG, device
        )
    if cfg.source_strong:
        return src_weak + src_strong, src_targets + src_targets, tgt_weak, tgt_strong, tgt_pairs
    return src_weak, src_targets, tgt_weak, tgt_strong, tgt_pairs


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (int(row[k]) if k == "iteration" else f"{row[k]:.6g}") for k in CSV_COLUMNS})
    return buf.getvalue()


def _bank_state(bank: MemoryBank) -> dict:
    """A memory as plain tensors/lists, for the training state (the refreshed memory lives in the state)."""
    fg = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bank.fg_columns().items()}
    bg = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bank.bg_columns().items()}
    return {"fg": fg, "bg": bg, "attrs": dict(bank.attrs), "path": str(bank.path) if bank.path else None}


def _bank_from_state(state: dict) -> MemoryBank:
    fg, bg = {k: v.numpy() for k, v in state["fg"].items()}, {k: v.numpy() for k, v in state["bg"].items()}
    return MemoryBank(
        fg_features=fg["features"],
        fg_labels=fg["labels"],
        fg_image_ids=fg["image_ids"],
        fg_object_ids=fg["object_ids"],
        fg_boxes=fg["boxes"],
        bg_features=bg["features"],
        bg_image_ids=bg["image_ids"],
        attrs=dict(state["attrs"]),
        fg_index=fg.get("index"),
        bg_index=bg.get("index"),
        path=Path(state["path"]) if state["path"] else None,
    )


def refresh_memory(detector: Detector, dataset, bank: MemoryBank, path: Path, device, progress: bool) -> MemoryBank:
    """Extract the memory of ``dataset`` again with ``detector`` and subsample it with the method and ratios
    recorded in ``bank``'s attributes (none recorded: keep everything); write it to ``path``, return it."""
    from vspa.coreset.kcenter import subsample_memory
    from vspa.memory.extract import extract_memory
    from vspa.memory.store import write_memory

    was_training = detector.training
    full_path = path.with_name(path.stem + ".full.h5")
    try:
        extract_memory(
            detector, dataset, full_path, device=device, keep=str(bank.attrs.get("keep", "all")), progress=progress
        )
    finally:
        detector.train(was_training)
    full = open_memory(full_path, expected_dim=detector.embed_dim)
    method = str(bank.attrs.get("subsample_method", "none"))
    subset, _ = subsample_memory(
        full,
        method=method,
        fg_ratio=float(bank.attrs.get("fg_ratio", 1.0)),
        bg_ratio=float(bank.attrs.get("bg_ratio", 1.0)),
        projection_dim=int(bank.attrs.get("projection_dim", 0)),
        seed=int(bank.attrs.get("subsample_seed", 0)),
        device=device,
    )
    write_memory(path, subset)
    full_path.unlink()
    return open_memory(path, expected_dim=detector.embed_dim)


def _load_state(path: Path, fingerprint: str) -> dict | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable state only means starting over
        print(f"[adapt] {path}: unreadable ({type(exc).__name__}); starting from iteration 0.", file=sys.stderr)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        print(f"[adapt] {path}: not an adaptation state; starting from iteration 0.", file=sys.stderr)
        return None
    if state.get("fingerprint") != fingerprint:
        print(
            f"[adapt] {path}: written with another configuration or other inputs; starting from iteration 0 "
            f"(it will be overwritten).",
            file=sys.stderr,
        )
        return None
    return state


def adapt(
    student: Detector,
    data: AdaptData,
    cfg: AdaptConfig,
    work_dir: str | Path,
    log_csv: str | Path,
    progress: bool = True,
) -> tuple[Detector, dict]:
    """Adapt ``student`` (the source detector; trained in place) and return ``(teacher, summary)``.

    ``work_dir/last.pt`` holds the resumable state (student, teacher, optimizer with the discriminators,
    memory, pairing bank, RNG, iteration, log rows), written atomically every ``checkpoint_every`` iterations
    and at the end; a call with the same configuration and inputs resumes from it. Refreshed memories are written to
    ``work_dir/memory_refresh.h5``. ``summary`` holds the mean timings and counts; rank 0 writes the CSV.
    """
    world_size = distributed.env_world_size()
    if cfg.batch_size % world_size:
        raise VspaError(
            f"params.yaml: adapt.batch_size {cfg.batch_size} is not divisible by the {world_size} processes. "
            f"Change batch_size or torchrun's --nproc_per_node."
        )
    for name, ds in (("source", data.source), ("target", data.target)):
        if len(ds) == 0:
            raise VspaError(f"adapt: the {name} split has no images. Check its annotations.json.")
        if list(ds.class_names) != list(data.source.class_names):
            raise VspaError(
                f"adapt: the target split's classes {list(ds.class_names)} differ from the source's "
                f"{list(data.source.class_names)}. Both domains need the same label space, in the same order."
            )
    if student.num_classes != len(data.source.class_names):
        raise VspaError(
            f"adapt: the source detector has {student.num_classes} classes, the source split "
            f"{len(data.source.class_names)}. Pretrain on this split first."
        )
    if cfg.needs_memory and data.memory_path is None:
        raise VspaError("adapt: fg_mode/bg_mode use the memory but no memory file was given (--memory PATH).")
    if cfg.use_pairing and data.pairing_table is None:
        raise VspaError("adapt: fg_mode pairing needs the pair table (AdaptData.pairing_table; build_pairing_table).")

    ctx = distributed.setup(cfg.device)
    device = ctx.device
    work_dir, log_csv = Path(work_dir), Path(log_csv)
    state_path = work_dir / "last.pt"
    refresh_path = work_dir / "memory_refresh.h5"

    student.to(device).train()
    teacher = make_teacher(student)
    step_module = StudentStep(student, cfg).to(device)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    precision = Precision(cfg.amp, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    inputs = data.fingerprint
    if cfg.use_pairing:
        inputs = {**inputs, "pairing": pairing_fingerprint(data.pairing_table)}
    fingerprint = sha256_json(
        {
            "adapt": {k: v for k, v in cfg.record().items() if k not in ("device", "checkpoint_every")},
            "model": student.cfg.to_dict(),
            "inputs": inputs,
        }
    )

    bank: MemoryBank | None = None
    if cfg.needs_memory:
        bank = open_memory(data.memory_path, expected_dim=student.embed_dim)
        if bank.class_names != list(data.source.class_names):
            raise VspaError(
                f"{data.memory_path}: memory classes {bank.class_names} differ from the source split's "
                f"{list(data.source.class_names)}. Re-extract the memory from this source split."
            )

    start, rows, refresh_seconds = 0, [], []
    state = _load_state(state_path, fingerprint) if state_path.is_file() else None
    if state is not None:
        step_module.load_state_dict(state["step"])  # the student and the discriminators
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("scaler"))
        if state["memory"] is not None:
            bank = _bank_from_state(state["memory"])
        set_rng_state(state["rng"])
        start, rows, refresh_seconds = int(state["iteration"]), list(state["rows"]), list(state["refresh_seconds"])
        if ctx.is_main:
            print(f"[adapt] resuming from {state_path} at iteration {start}/{cfg.iterations}", file=sys.stderr)

    pair_bank: PairingBank | None = None
    if cfg.use_pairing:
        if state is not None and state.get("pairing") is not None:
            pair_bank = PairingBank.from_state(state["pairing"])  # the bank of the last refresh
        else:  # every process embeds the same counterparts with the same weights (eval mode, no random draw)
            pair_bank = PairingBank.extract(
                student, data.pairing_table, cfg.pairing_mode, progress=progress and ctx.is_main
            )
        step_module.pairing_bank = pair_bank

    def use_memory(new_bank: MemoryBank | None) -> None:
        step_module.retriever = Retriever(new_bank, device) if new_bank is not None else None
        if new_bank is not None:
            step_module.aligner.set_memory(new_bank, device)

    use_memory(bank)
    model = step_module
    if ctx.enabled:
        model = DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # e.g. no pseudo-label in a batch: the box head gets no fg gradient
        )

    def checkpoint(iteration: int) -> None:
        if ctx.is_main:
            save_torch_atomic(
                {
                    "format": STATE_FORMAT,
                    "fingerprint": fingerprint,
                    "iteration": iteration,
                    "step": step_module.state_dict(),
                    "teacher": teacher.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **({"scaler": precision.state_dict()} if precision.enabled else {}),
                    "memory": _bank_state(bank) if bank is not None and bank.path != data.memory_path else None,
                    "pairing": pair_bank.state_dict() if pair_bank is not None else None,
                    "rng": rng_state(),
                    "rows": rows,
                    "refresh_seconds": refresh_seconds,
                },
                state_path,
            )
            _write_logs(log_csv, rows)
        distributed.barrier(ctx)

    share = cfg.batch_size // ctx.world_size
    positions = range(ctx.rank * share, (ctx.rank + 1) * share)
    bar = tqdm(
        range(start, cfg.iterations),
        initial=start,
        total=cfg.iterations,
        desc="adapt",
        unit="it",
        disable=(None if progress else True) if ctx.is_main else True,
    )
    detector_ids = {id(p) for p in student.parameters()}
    for it in bar:
        t_iter: list[float] = []
        t_backward: list[float] = []
        step_module.iteration = it
        with _timer(device, t_iter):
            src_images, src_targets, tgt_weak, tgt_strong, tgt_pairs = _batch(data, cfg, it, positions, device)
            # without a target loss (fair source only) there are no target images: the teacher is only the EMA
            with precision.autocast():
                detections = teacher_detect(teacher, tgt_weak) if tgt_weak else []
            pseudo = filter_pseudo_labels([{k: v.float() if k != "labels" else v for k, v in d.items()}
                                           for d in detections], cfg.tau)
            pseudo_targets = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo]

            torch.manual_seed(derive_seed(cfg.seed, it, ctx.rank, _SAMPLER))
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, it, ctx.rank, _ALIGN))
            lr = optimizer.param_groups[0]["lr"]
            with precision.autocast():
                if cfg.use_pairing:
                    losses = model(src_images, src_targets, tgt_weak, tgt_strong, pseudo_targets, generator, tgt_pairs)
                else:
                    losses = model(src_images, src_targets, tgt_weak, tgt_strong, pseudo_targets, generator)
            n_tgt = max(len(pseudo), 1)
            losses["pseudo_per_image"] = losses["total"].new_tensor(sum(len(p["labels"]) for p in pseudo) / n_tgt)
            # diagnostic only: the target's labels are compared with the pseudo-labels and logged, nothing more
            tp, n_pseudo, n_gt = diagnostics.pseudo_label_counts(pseudo, tgt_pairs)
            for key, value in (("pseudo_tp", tp), ("pseudo_n", n_pseudo), ("gt_n", n_gt)):
                losses[key] = losses["total"].new_tensor(value / n_tgt)
            terms = losses.pop("terms")
            names = [c for c in CSV_COLUMNS + diagnostics.ITER_COLUMNS if c in losses and c != "time_align"]
            names = list(dict.fromkeys(names))
            logged = distributed.all_reduce_mean(torch.stack([losses[k].detach().float() for k in names]), ctx)
            values = dict(zip(names, logged.cpu().tolist()))
            if not math.isfinite(values["total"]):
                raise VspaError(
                    f"adaptation diverged at iteration {it + 1}: non-finite loss "
                    f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}). Lower adapt.lr (now {cfg.lr:g}) "
                    f"or the loss weights."
                )
            optimizer.zero_grad(set_to_none=True)
            sample = bool(cfg.diag_every) and it % cfg.diag_every == 0 and not ctx.enabled
            with _timer(device, t_backward):
                if sample:  # the same gradient, term by term, with each term's norm on the detector
                    scaled = {k: precision.scale(v) if v.requires_grad else v for k, v in terms.items()}
                    shares = diagnostics.shares(diagnostics.term_gradients(scaled, params, detector_ids))
                else:
                    precision.backward(losses["total"])
                    shares = {k: float("nan") for k in diagnostics.SHARE_COLUMNS[1:-1]}
            precision.step(optimizer)
            scheduler.step()
            ema_update(teacher, student, cfg.ema_keep)
        rows.append(
            {
                "iteration": it + 1,
                "lr": lr,
                **values,
                "fg_pairs": values["fg_pairs"] * ctx.world_size,  # the mean over processes -> the total
                "time_iter": t_iter[0],
                "time_align": float(losses["time_align"]),
                "time_backward": t_backward[0],
                **shares,
            }
        )
        bar.set_postfix(loss=f"{values['total']:.3f}", pseudo=f"{values['pseudo_per_image']:.1f}")

        done = it + 1
        if cfg.refresh_every and bank is not None and done % cfg.refresh_every == 0 and done < cfg.iterations:
            refresh_start = time.perf_counter()
            source_model = student if cfg.refresh_model == "student" else teacher
            if ctx.is_main:
                refresh_memory(source_model, data.source, bank, refresh_path, device, progress and ctx.is_main)
            distributed.barrier(ctx)
            bank = open_memory(refresh_path, expected_dim=student.embed_dim)
            use_memory(bank)
            if pair_bank is not None:  # the counterparts embedded by the same model as the memory
                pair_bank = PairingBank.extract(
                    source_model, data.pairing_table, cfg.pairing_mode, progress=progress and ctx.is_main
                )
                step_module.pairing_bank = pair_bank
            refresh_seconds.append(time.perf_counter() - refresh_start)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done < cfg.iterations and ctx.is_main:
            detector_checkpoint.save(work_dir / f"teacher_{done}.pt", teacher, teacher.cfg,
                                     list(data.source.class_names), extra={"stage": "adapt", "snapshot": done})
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            checkpoint(done)
    bar.close()
    if start >= cfg.iterations and ctx.is_main:
        _write_logs(log_csv, rows)
    distributed.barrier(ctx)
    summary = summarize(rows, refresh_seconds, cfg)
    summary["diagnostics"] = diagnostics.summarize_diagnostics(rows)
    return teacher, summary


def _write_logs(log_csv: Path, rows: list[dict]) -> None:
    """``losses.csv``, and beside it ``diagnostics.csv`` and ``grad_shares.csv`` (atomic writes)."""
    write_text_atomic(log_csv, _csv_text(rows))
    write_text_atomic(log_csv.with_name("diagnostics.csv"), diagnostics.iteration_csv_text(rows))
    write_text_atomic(log_csv.with_name("grad_shares.csv"), diagnostics.shares_csv_text(rows))


def summarize(rows: list[dict], refresh_seconds: list[float], cfg: AdaptConfig) -> dict:
    """Mean time per iteration (all of it, and the alignment + retrieval part), refresh time and counts."""
    if not rows:
        return {"iterations": 0}
    # the first iterations include one-off costs (allocations, caches): leave out the first 10% (at most 20)
    skip = min(20, len(rows) // 10)
    timed = rows[skip:]
    mean_iter = float(np.mean([r["time_iter"] for r in timed]))
    mean_align = float(np.mean([r["time_align"] for r in timed]))
    return {
        "iterations": len(rows),
        "sec_per_iter": mean_iter,
        "align_sec_per_iter": mean_align,
        "align_fraction": mean_align / mean_iter if mean_iter > 0 else float("nan"),
        "refreshes": len(refresh_seconds),
        "refresh_seconds_total": float(sum(refresh_seconds)),
        "pseudo_labels_per_image": float(np.mean([r["pseudo_per_image"] for r in rows])),
        "fg_pairs_per_iter": float(np.mean([r["fg_pairs"] for r in rows])),
        "final_losses": {k: rows[-1][k] for k in ("loss_sup", "loss_unsup", "loss_img", "loss_fg", "loss_bg", "total")},
        "fg_mode": cfg.fg_mode,
        "bg_mode": cfg.bg_mode,
        "timed_iterations": len(timed),
        **({"pairing_mode": cfg.pairing_mode} if cfg.fg_mode == "pairing" else {}),
    }


def input_fingerprint(source_ckpt: Path, source_json: Path, target_json: Path, memory: Path | None) -> dict:
    """Hashes of the inputs of an adaptation run (part of the resume fingerprint)."""
    fixes = {
        "source model": "run `dvc repro pretrain` or pass --model",
        "source data": "run `dvc repro prepare` or pass --source",
        "target data": "run `dvc repro prepare` or pass --target",
        "memory": "create it with `dvc repro extract_memory subsample` or pass --memory",
    }
    paths = {"source model": source_ckpt, "source data": source_json, "target data": target_json, "memory": memory}
    out = {}
    for what, path in paths.items():
        if path is None:
            out[what] = None
            continue
        if not Path(path).is_file():
            raise VspaError(f"{path}: {what} file not found; {fixes[what]}.")
        out[what] = sha256_file(path)
    return out
