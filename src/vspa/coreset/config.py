"""The ``subsample`` params section: :class:`SubsampleConfig` (parsed by :func:`vspa.config.parse_section`)."""

from __future__ import annotations

from dataclasses import dataclass

from vspa.config import check_choice, check_device, check_number
from vspa.coreset.kcenter import METHODS


@dataclass
class SubsampleConfig:
    """The ``subsample`` params section; the values are in conf/config.yaml."""

    method: str  # coreset (greedy k-center) | random | none (keep everything)
    fg_ratio: float  # kept fraction of the foreground memory, per class, in (0, 1]
    bg_ratio: float  # kept fraction of the background memory, in (0, 1]
    projection_dim: int  # random projection before k-center, >= 0 (0 = none)
    seed: int
    device: str  # auto | cpu | cuda | cuda:<index>

    def validate(self, name: str = "subsample", path: str = "params.yaml") -> None:
        check_choice(self.method, METHODS, f"{name}.method", path)
        for key in ("fg_ratio", "bg_ratio"):
            value = getattr(self, key)
            check_number(0.0 < value <= 1.0, value, f"{name}.{key}", "in (0, 1] (a fraction such as 0.5)", path)
        check_number(
            self.projection_dim >= 0, self.projection_dim, f"{name}.projection_dim", ">= 0 (0 = no projection)", path
        )
        check_device(self.device, f"{name}.device", path)
