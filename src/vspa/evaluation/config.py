"""The ``evaluate`` params section: :class:`EvalConfig` (parsed by :func:`vspa.config.parse_section`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vspa.config import check_device, check_number
from vspa.utils import VspaError

SUBSETS_EXAMPLE = "{beta_0.02: {fog_beta: 0.02}}"


@dataclass
class EvalConfig:
    """The ``evaluate`` params section; the values are in conf/config.yaml (``subsets`` in a scenario preset)."""

    device: str  # auto | cpu | cuda | cuda:<index>
    iou: float  # IoU at which a detection matches a ground-truth box, in (0, 1]
    batch_size: int  # images per inference batch, >= 1
    # named subsets of the split's images scored on their own (e.g. each fog level of Foggy Cityscapes): subset
    # name -> {image field: value}; only the cityscapes_foggy preset sets it, so params.yaml may omit it
    subsets: dict = field(
        default_factory=dict,
        metadata={"hint": f"Map a subset name to the image fields it selects, e.g. {SUBSETS_EXAMPLE}."},
    )

    def validate(self, name: str = "evaluate", path: str = "params.yaml") -> None:
        check_device(self.device, f"{name}.device", path)
        check_number(0.0 < self.iou <= 1.0, self.iou, f"{name}.iou", "in (0, 1]", path)
        check_number(self.batch_size >= 1, self.batch_size, f"{name}.batch_size", "at least 1", path)
        for sub, spec in self.subsets.items():
            if not isinstance(spec, dict) or not spec:
                raise VspaError(
                    f"{path}: {name}.subsets.{sub} must map image fields to values (e.g. "
                    f"{{fog_beta: 0.02}} in {SUBSETS_EXAMPLE}), got {spec!r}."
                )
