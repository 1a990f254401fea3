"""The translator's params: the ``translate:`` section as :class:`TranslateConfig`, and its variants."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vspa.config import check_choice, check_device, check_number, parse_section
from vspa.translation.generator import TranslatorConfig
from vspa.translation.losses import GAN_MODES
from vspa.utils import VspaError

VARIANTS = {"cut": (False, False), "attention": (True, False), "attention_lg": (True, True)}  # (attention, L_GA)
DEFAULT_VARIANT = "attention_lg"  # the variant when neither --variant nor translate.variant names one
LG_GRID = 4  # L_GA's local views: a LG_GRID x LG_GRID grid of patches


@dataclass(frozen=True)
class TranslateConfig:
    """The ``translate:`` params section, parsed by :meth:`from_params` (:func:`vspa.config.parse_section`).

    Every key but ``variant`` is required: the values are stated once, in conf/config.yaml (composed into
    params.yaml). ``variant`` is not in params.yaml: dvc.yaml's foreach passes it (``--variant``).
    """

    iterations: int
    batch_size: int
    lr: float
    lr_decay_start: float  # fraction of the run at constant lr; then linear decay to ~0 at the last iteration
    crop_height: int | None  # null (with crop_width null): whole images
    crop_width: int | None
    ngf: int
    n_blocks: int
    n_content: int
    ndf: int
    gan_mode: str  # lsgan | bce
    lambda_gan: float
    lambda_nce: float
    lambda_ga: float  # weight of L_GA after the warm-up
    ga_warmup: int  # L_GA's weight rises linearly from 0 to lambda_ga over these iterations (0: from the start)
    num_patches: int
    nce_tau: float
    queue_size: int
    momentum: float
    ga_tau: float
    seed: int
    device: str
    checkpoint_every: int
    variant: str = DEFAULT_VARIANT  # cut | attention | attention_lg

    @classmethod
    def from_params(cls, section: dict | None, name: str = "translate", path: str = "params.yaml") -> "TranslateConfig":
        """The params section (e.g. ``stage_config(...)["translate"]``): unknown keys, missing values, wrong types
        and bad values are VspaErrors naming ``path`` and the key."""
        return parse_section(cls, section, name, path)

    def validate(self, name: str = "translate", path: str = "params.yaml") -> None:
        check_choice(self.variant, tuple(VARIANTS), f"{name}.variant", path)
        check_choice(self.gan_mode, GAN_MODES, f"{name}.gan_mode", path)
        checks = [  # (ok, key, requirement)
            *[
                (getattr(self, key) >= 1, key, "a positive integer")
                for key in (
                    "iterations",
                    "batch_size",
                    "ngf",
                    "n_blocks",
                    "n_content",
                    "ndf",
                    "num_patches",
                    "queue_size",
                    "checkpoint_every",
                )
            ],
            *[
                (getattr(self, key) > 0 and math.isfinite(getattr(self, key)), key, "a positive number")
                for key in ("lr", "nce_tau", "ga_tau")
            ],
            *[
                (getattr(self, key) >= 0 and math.isfinite(getattr(self, key)), key, ">= 0")
                for key in ("lambda_gan", "lambda_nce", "lambda_ga")
            ],
            (self.ga_warmup >= 0, "ga_warmup", ">= 0"),
            (0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)"),
            (0.0 <= self.lr_decay_start < 1.0, "lr_decay_start", "in [0, 1)"),
            (self.seed >= 0, "seed", ">= 0"),
        ]
        for ok, key, requirement in checks:
            check_number(ok, getattr(self, key), f"{name}.{key}", requirement, path)
        check_device(self.device, f"{name}.device", path)
        if (self.crop_height is None) != (self.crop_width is None):
            raise VspaError(f"{path}: set both {name}.crop_height and {name}.crop_width, or both to null.")
        if self.crop_height is not None:
            step = self.size_multiple
            for key in ("crop_height", "crop_width"):
                value = getattr(self, key)
                if value < step or value % step:
                    raise VspaError(
                        f"{path}: {name}.{key} must be a positive multiple of {step} "
                        f"(variant {self.variant}), got {value!r}."
                    )

    @property
    def attention(self) -> bool:
        return VARIANTS[self.variant][0]

    @property
    def local_global(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def size_multiple(self) -> int:
        """Training crops: multiples of 4 (two stride-2 convs), of 16 with L_GA (a 4x4 grid of such patches)."""
        return 4 * LG_GRID if self.local_global else 4

    def translator_config(self) -> TranslatorConfig:
        return TranslatorConfig(
            attention=self.attention, ngf=self.ngf, n_blocks=self.n_blocks, n_content=self.n_content
        )

    def to_dict(self) -> dict:
        return asdict(self)
