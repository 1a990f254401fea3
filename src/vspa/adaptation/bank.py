"""The memory in the adaptation's resumable state (:func:`_bank_state`, :func:`_bank_from_state`) and its
refresh with the current model (:func:`refresh_memory`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vspa.detection.model import Detector
from vspa.memory.store import MemoryBank, open_memory


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
