"""The ``adapt`` params section: :class:`AdaptConfig` and the values its string options take."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vspa.adaptation.align import BG_MODES, FG_MODES, FG_NEGATIVES
from vspa.adaptation.data import PAIRING_EXAMPLES, PAIRING_FOLDERS
from vspa.adaptation.pairing import PAIRING_MODES
from vspa.detection.train import WARMUP_FACTOR
from vspa.utils import VspaError

FG_BOXES = ("teacher", "student")
ALIGN_VIEWS = ("weak", "strong")
REFRESH_MODELS = ("student", "teacher")
BG_FORMS = ("paper", "scaled", "confusion")


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
                if f.type == "str" and value is False:  # YAML 1.1 reads an unquoted `off` (e.g. written by
                    value = "off"                       # `dvc exp run -S adapt.bg_mode=off`) as false
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
