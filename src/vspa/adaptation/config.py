"""The ``adapt`` params section: :class:`AdaptConfig` and the values its string options take."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vspa.adaptation.align import BG_MODES, FG_MODES, FG_NEGATIVES
from vspa.adaptation.data import PAIRING_EXAMPLES, PAIRING_FOLDERS
from vspa.adaptation.pairing import PAIRING_MODES
from vspa.config import check_device, check_number, parse_section
from vspa.training import schedule
from vspa.utils import VspaError

FG_BOXES = ("teacher", "student")
ALIGN_VIEWS = ("weak", "strong")
REFRESH_MODELS = ("student", "teacher")
BG_FORMS = ("paper", "scaled", "confusion")
OFF_KEYS = ("fg_mode", "bg_mode")  # keys whose value "off" YAML 1.1 reads as false when unquoted


@dataclass(kw_only=True)
class AdaptConfig:
    """The ``adapt`` params section (with a per-run override section merged over it), parsed by
    :meth:`from_params` (:func:`vspa.config.parse_section`).

    The values are in conf/config.yaml and the scenario presets (composed into params.yaml); a field has a default
    here only when no conf file states it (tests/test_config_defaults.py). Keyword-only, so the fields keep their
    order (that of :meth:`record`, the records and the resume fingerprints) whichever have defaults.
    """

    iterations: int
    batch_size: int  # source images and target images per iteration (global, split over the processes)
    lr: float
    seed: int
    device: str
    momentum: float
    weight_decay: float = 1e-4
    warmup_iters: int
    ema_keep: float
    tau: float
    lambda_unsup: float
    lambda_img: float
    lambda_fg: float
    lambda_bg: float
    fg_mode: str  # memory | inbatch_c2c | inbatch_agnostic | prototype | pairing | off
    bg_mode: str  # memory | off
    fg_boxes: str  # whose detections (score >= tau) give the target instances: teacher | student
    # fg_mode memory: the triplet's negative: random (paper) | hard (nearest other-class entry) | both (one of each)
    fg_negative: str
    top_k: int
    margin: float
    # paper: unit vectors into the discriminator, gradient reversal | scaled: inputs x bg_scale, reversal |
    # confusion: inputs x bg_scale, discriminator on detached features, confusion loss for the features
    bg_form: str
    bg_scale: float  # scaled / confusion: factor on the unit vectors the background discriminator sees
    bg_warmup: int  # scaled / confusion: the features' gradient ramps from 0 to lambda_bg over these iterations
    diag_every: int  # gradient share of each loss term every N iterations (0 = never)
    disc_full_rate: bool = True  # discriminators learn at the full rate; lambda scales the reversed gradient
    img_disc_width: int = 64
    source_strong: bool = True  # supervised loss also on the strong source view (Adaptive Teacher)
    align_view: str = "weak"  # target view of the discriminators and the fg/bg features: weak | strong
    refresh_every: int  # 0: never refresh the memory
    refresh_model: str  # student | teacher
    checkpoint_every: int
    # also keep the teacher every N iterations as work_dir/teacher_<N>.pt (0 = never): for choosing the iteration
    # budget on target validation from one run (benchmarks/bench_rows.py evaluates them); recorded only when on
    snapshot_every: int = 0
    amp: bool  # mixed precision (float16 on CUDA, bfloat16 on the CPU): vspa.training.precision
    # fg_mode pairing only (the AugSim -> FoggyAugSim experiment; see vspa.adaptation.pairing)
    pairing_mode: str = "exact"  # exact | color | flip | color_flip: what a target object's positive differs in
    pairing_original: str = ""  # the original source split folder (every object as it is, variant "none")
    pairing_variants: str = ""  # the folder of the variant sets color/, flip/, color_flip/ (stage augsim)

    @classmethod
    def from_params(cls, section: dict | None, name: str = "adapt", path: str = "params.yaml") -> "AdaptConfig":
        """The effective params section (``null`` = the default) parsed by :func:`vspa.config.parse_section`:
        unknown keys, missing required values, wrong types and bad values are VspaErrors naming ``path`` and the
        key. An unquoted ``off`` for one of :data:`OFF_KEYS` (YAML 1.1 reads it as false; e.g. written by
        ``dvc exp run -S adapt.bg_mode=off``) means ``"off"``."""
        if isinstance(section, dict):
            section = {k: "off" if k in OFF_KEYS and v is False else v for k, v in section.items()}
        return parse_section(cls, section, name, path)

    def validate(self, name: str = "adapt", path: str = "params.yaml") -> None:
        def one_of(choices: tuple[str, ...]) -> str:
            return f"one of {', '.join(choices)}"

        checks = [  # (ok, key, requirement)
            *schedule.sgd_checks(self),
            (0 <= self.ema_keep <= 1, "ema_keep", "in [0, 1]"),
            (0 <= self.tau <= 1, "tau", "in [0, 1]"),
            *[(getattr(self, k) >= 0, k, ">= 0") for k in ("lambda_unsup", "lambda_img", "lambda_fg", "lambda_bg")],
            (self.fg_mode in FG_MODES, "fg_mode", one_of(FG_MODES)),
            (self.bg_mode in BG_MODES, "bg_mode", one_of(BG_MODES)),
            (self.fg_boxes in FG_BOXES, "fg_boxes", one_of(FG_BOXES)),
            (self.fg_negative in FG_NEGATIVES, "fg_negative", one_of(FG_NEGATIVES)),
            (self.bg_form in BG_FORMS, "bg_form", one_of(BG_FORMS)),
            (self.bg_warmup >= 0, "bg_warmup", ">= 0"),
            (self.bg_scale > 0 and math.isfinite(self.bg_scale), "bg_scale", "a positive number"),
            (self.diag_every >= 0, "diag_every", ">= 0 (0 = never)"),
            (self.align_view in ALIGN_VIEWS, "align_view", one_of(ALIGN_VIEWS)),
            (self.top_k >= 1, "top_k", ">= 1"),
            (self.margin >= 0, "margin", ">= 0"),
            (self.img_disc_width >= 1, "img_disc_width", ">= 1"),
            (self.refresh_every >= 0, "refresh_every", ">= 0 (0 = never)"),
            (self.refresh_model in REFRESH_MODELS, "refresh_model", one_of(REFRESH_MODELS)),
            (self.snapshot_every >= 0, "snapshot_every", ">= 0 (0 = never)"),
            (self.pairing_mode in PAIRING_MODES, "pairing_mode", one_of(PAIRING_MODES)),
        ]
        for ok, key, requirement in checks:
            check_number(ok, getattr(self, key), f"{name}.{key}", requirement, path)
        check_device(self.device, f"{name}.device", path)
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
        """Constant learning rate after a linear warm-up (the paper: no decay;
        :func:`vspa.training.schedule.lr_factor` without steps)."""
        return schedule.lr_factor(iteration, self.warmup_iters)
