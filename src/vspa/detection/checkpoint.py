"""Detector checkpoints: weights plus everything needed to rebuild the detector (written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vspa.detection.model import Detector, DetectorConfig, build_detector
from vspa.utils import VspaError, save_torch_atomic

FORMAT = "vspa-detector/1"


def save(
    path: str | Path,
    detector: Detector,
    cfg: DetectorConfig,
    class_names: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``detector``'s weights, its config, class names and ``extra`` (e.g. training info) to ``path``."""
    if len(class_names) != detector.num_classes:
        raise ValueError(f"{len(class_names)} class names for a detector with {detector.num_classes} classes")
    state = {k: v.detach().cpu() for k, v in detector.state_dict().items()}
    save_torch_atomic(
        {
            "format": FORMAT,
            "config": cfg.to_dict(),
            "num_classes": detector.num_classes,
            "class_names": list(class_names),
            "extra": extra or {},
            "state_dict": state,
        },
        path,
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector saved at ``path`` on ``device`` (in eval mode).

    Returns ``(detector, meta)`` with meta keys ``config`` (DetectorConfig), ``num_classes``, ``class_names``
    and ``extra``. The backbone's pretrained-weights file is not read again: the checkpoint has all weights.
    """
    path = Path(path)
    fix = "Rerun the stage that writes it (e.g. `dvc repro pretrain`) or pass the right path."
    if not path.is_file():
        raise VspaError(f"{path}: detector checkpoint not found. {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or corrupt files all get the same advice
        raise VspaError(f"{path}: cannot read the detector checkpoint ({type(exc).__name__}: {exc}). {fix}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise VspaError(f"{path}: not a vspa detector checkpoint (expected format '{FORMAT}'). {fix}")
    try:
        cfg = DetectorConfig(**ckpt["config"])
        detector = build_detector(cfg, int(ckpt["num_classes"]), load_weights=False)
        detector.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise VspaError(
            f"{path}: the detector checkpoint is incomplete or does not match its config ({exc}). {fix}"
        ) from exc
    detector.to(device).eval()
    meta = {
        "config": cfg,
        "num_classes": int(ckpt["num_classes"]),
        "class_names": list(ckpt["class_names"]),
        "extra": ckpt.get("extra", {}),
    }
    return detector, meta
