"""`vspa memory inspect FILE`: a readable summary of a memory file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vspa.memory.store import open_memory


def _row(name: str, features: np.ndarray, image_ids: np.ndarray) -> list:
    """Table row: entries, distinct images, mean / min / max feature norm."""
    if len(features) == 0:
        return [name, 0, 0, "-", "-", "-"]
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    stats = (f"{v:.3f}" for v in (norms.mean(), norms.min(), norms.max()))
    return [name, len(features), len(np.unique(image_ids)), *stats]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def inspect_memory(path: str | Path) -> str:
    """Counts per class, feature dimension, feature-norm statistics and the attributes of a memory file.

    The file is validated first (:func:`open_memory`), so a broken file gives its VspaError instead.
    """
    bank = open_memory(path)
    header = ["group / class", "entries", "images", "norm mean", "norm min", "norm max"]
    rows = []
    for c, name in enumerate(bank.class_names, start=1):
        sel = bank.fg_labels == c
        rows.append(_row(f"fg / {name}", bank.fg_features[sel], bank.fg_image_ids[sel]))
    rows.append(_row("fg (all)", bank.fg_features, bank.fg_image_ids))
    rows.append(_row("bg", bank.bg_features, bank.bg_image_ids))

    out = [f"memory file: {bank.path}", f"feature dim: {bank.feature_dim}"]
    if bank.fg_index is not None:
        out.append("subsampled: yes (fg/index and bg/index give each row's place in the full memory)")
    out += ["", _table(header, rows), "", "attributes:"]
    width = max(len(k) for k in bank.attrs)
    for key in sorted(bank.attrs):
        value = bank.attrs[key]
        if isinstance(value, list):
            value = ", ".join(value)
        out.append(f"  {key.ljust(width)}  {value}")
    return "\n".join(out)
