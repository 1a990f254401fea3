"""The memory file: one HDF5 file with a foreground group ``fg`` and a background group ``bg``.

Layout (format version 1)::

    /fg/features    float32 [N, D]   box-head embedding of each ground-truth object, as extracted
    /fg/labels      int64   [N]      class label, contiguous 1..C
    /fg/image_ids   int64   [N]
    /fg/object_ids  int64   [N]
    /fg/boxes       float32 [N, 4]   xyxy in original image pixels
    /fg/index       int64   [N]      subsampled files only: the row in the full memory
    /bg/features    float32 [M, D]   one background embedding per image
    /bg/image_ids   int64   [M]
    /bg/index       int64   [M]      subsampled files only
    attributes: feature_dim, format_version, checkpoint_sha256, dataset_sha256, class_names, keep, ...

Files are written through :func:`memory_writer`, which appends rows in chunks to resizable datasets of a
temporary file and renames it onto the target only when everything was written.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from vspa.utils import VspaError, atomic_path

FORMAT_VERSION = 1

# name -> (dtype, trailing shape); a trailing shape of None means "feature_dim"
FG_COLUMNS = {
    "features": (np.float32, None),
    "labels": (np.int64, ()),
    "image_ids": (np.int64, ()),
    "object_ids": (np.int64, ()),
    "boxes": (np.float32, (4,)),
}
BG_COLUMNS = {
    "features": (np.float32, None),
    "image_ids": (np.int64, ()),
}
INDEX_COLUMN = {"index": (np.int64, ())}

REGENERATE = "Regenerate it with `dvc repro extract_memory subsample` (or delete it and rerun)."


@dataclass
class MemoryBank:
    """A memory held in RAM: foreground rows (one per object) and background rows (one per image).

    ``fg_index`` / ``bg_index`` are set for subsampled memories: the row of each entry in the full memory.
    ``attrs`` holds the file attributes (``class_names`` as a list of str).
    """

    fg_features: np.ndarray
    fg_labels: np.ndarray
    fg_image_ids: np.ndarray
    fg_object_ids: np.ndarray
    fg_boxes: np.ndarray
    bg_features: np.ndarray
    bg_image_ids: np.ndarray
    attrs: dict = field(default_factory=dict)
    fg_index: np.ndarray | None = None
    bg_index: np.ndarray | None = None
    path: Path | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.fg_features.shape[1])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names", []))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fg_columns(self) -> dict[str, np.ndarray]:
        cols = {name: getattr(self, f"fg_{name}") for name in FG_COLUMNS}
        if self.fg_index is not None:
            cols["index"] = self.fg_index
        return cols

    def bg_columns(self) -> dict[str, np.ndarray]:
        cols = {name: getattr(self, f"bg_{name}") for name in BG_COLUMNS}
        if self.bg_index is not None:
            cols["index"] = self.bg_index
        return cols

    def subset(self, fg_rows: np.ndarray, bg_rows: np.ndarray, attrs: dict | None = None) -> "MemoryBank":
        """The rows ``fg_rows`` / ``bg_rows`` (indices into this bank), with ``index`` pointing back here
        (or to this bank's own full memory when it is itself a subset)."""
        fg_rows = np.asarray(fg_rows, dtype=np.int64)
        bg_rows = np.asarray(bg_rows, dtype=np.int64)
        return MemoryBank(
            fg_features=self.fg_features[fg_rows],
            fg_labels=self.fg_labels[fg_rows],
            fg_image_ids=self.fg_image_ids[fg_rows],
            fg_object_ids=self.fg_object_ids[fg_rows],
            fg_boxes=self.fg_boxes[fg_rows],
            bg_features=self.bg_features[bg_rows],
            bg_image_ids=self.bg_image_ids[bg_rows],
            attrs=dict(self.attrs if attrs is None else attrs),
            fg_index=fg_rows if self.fg_index is None else self.fg_index[fg_rows],
            bg_index=bg_rows if self.bg_index is None else self.bg_index[bg_rows],
        )


# --------------------------------------------------------------------------- writing


class _Group:
    """Buffered appends to the resizable datasets of one group."""

    def __init__(self, group: h5py.Group, columns: dict, feature_dim: int, chunk_rows: int):
        self.columns = columns
        self.feature_dim = feature_dim
        self.chunk_rows = chunk_rows
        self.datasets = {}
        for name, (dtype, shape) in columns.items():
            trailing = (feature_dim,) if shape is None else shape
            # HDF5 chunks of about 1 MiB for the feature matrix; whole buffers are written at once.
            rows = max(1, min(chunk_rows, (1 << 20) // (4 * max(1, int(np.prod(trailing))))))
            self.datasets[name] = group.create_dataset(
                name, shape=(0, *trailing), maxshape=(None, *trailing), dtype=dtype, chunks=(rows, *trailing)
            )
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in columns}
        self.buffered = 0
        self.rows = 0

    def append(self, **cols) -> None:
        if set(cols) != set(self.columns):
            raise ValueError(f"expected columns {sorted(self.columns)}, got {sorted(cols)}")
        n = None
        for name, (dtype, shape) in self.columns.items():
            arr = np.asarray(cols[name], dtype=dtype)
            trailing = (self.feature_dim,) if shape is None else shape
            if arr.shape[1:] != tuple(trailing) or (n is not None and len(arr) != n):
                raise ValueError(f"column {name}: shape {arr.shape} does not match the others / {trailing}")
            n = len(arr)
            self.buffer[name].append(arr)
        self.buffered += n
        if self.buffered >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.buffered == 0:
            return
        start, stop = self.rows, self.rows + self.buffered
        for name, parts in self.buffer.items():
            ds = self.datasets[name]
            ds.resize(stop, axis=0)
            ds[start:stop] = np.concatenate(parts)
            parts.clear()
        self.rows, self.buffered = stop, 0


class MemoryWriter:
    """Appends foreground / background rows to an open memory file (see :func:`memory_writer`)."""

    def __init__(self, f: h5py.File, feature_dim: int, chunk_rows: int, with_index: bool):
        extra = INDEX_COLUMN if with_index else {}
        self.fg = _Group(f.create_group("fg"), {**FG_COLUMNS, **extra}, feature_dim, chunk_rows)
        self.bg = _Group(f.create_group("bg"), {**BG_COLUMNS, **extra}, feature_dim, chunk_rows)

    def append_fg(self, **cols) -> None:
        """Columns ``features, labels, image_ids, object_ids, boxes`` (and ``index``) for some rows."""
        self.fg.append(**cols)

    def append_bg(self, **cols) -> None:
        """Columns ``features, image_ids`` (and ``index``) for some rows."""
        self.bg.append(**cols)

    def flush(self) -> None:
        self.fg.flush()
        self.bg.flush()


def _attr_value(value):
    if isinstance(value, (list, tuple)):
        return np.array([str(v) for v in value], dtype=h5py.string_dtype())
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


@contextlib.contextmanager
def memory_writer(
    path: str | Path, feature_dim: int, attrs: dict, chunk_rows: int = 4096, with_index: bool = False
) -> Iterator[MemoryWriter]:
    """Open a memory file for streaming writes; it appears at ``path`` only when the block succeeds.

    Rows are buffered and written ``chunk_rows`` at a time, so memory use is bounded by the buffer.
    ``attrs`` (str, numbers, lists of str) become file attributes; ``feature_dim`` and ``format_version``
    are added.
    """
    if chunk_rows < 1:
        raise VspaError(f"chunk_rows={chunk_rows} must be at least 1. Set extract_memory.chunk_rows to e.g. 4096.")
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)
            f.attrs["feature_dim"] = int(feature_dim)
            f.attrs["format_version"] = FORMAT_VERSION
            writer = MemoryWriter(f, feature_dim, chunk_rows, with_index)
            yield writer
            writer.flush()


def write_memory(path: str | Path, bank: MemoryBank, chunk_rows: int = 4096) -> None:
    """Write ``bank`` to ``path`` atomically (``index`` columns are written when the bank has them)."""
    with_index = bank.fg_index is not None
    if with_index != (bank.bg_index is not None):
        raise ValueError("fg_index and bg_index must both be set or both be None")
    attrs = {k: v for k, v in bank.attrs.items() if k not in ("feature_dim", "format_version")}
    with memory_writer(path, bank.feature_dim, attrs, chunk_rows, with_index) as w:
        fg, bg = bank.fg_columns(), bank.bg_columns()
        for start in range(0, len(bank.fg_labels), chunk_rows):
            w.append_fg(**{k: v[start : start + chunk_rows] for k, v in fg.items()})
        for start in range(0, len(bank.bg_image_ids), chunk_rows):
            w.append_bg(**{k: v[start : start + chunk_rows] for k, v in bg.items()})


# --------------------------------------------------------------------------- reading and validation


def _read_attrs(f: h5py.File) -> dict:
    out = {}
    for key, value in f.attrs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            value = [v.decode() if isinstance(v, bytes) else str(v) for v in value]
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _nonfinite_rows(path: Path, group: str, features: np.ndarray, chunk_rows: int = 65536) -> None:
    bad = []
    for start in range(0, len(features), chunk_rows):
        ok = np.isfinite(features[start : start + chunk_rows]).all(axis=1)
        bad.extend((start + np.flatnonzero(~ok)).tolist())
    if bad:
        shown = ", ".join(str(r) for r in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise VspaError(
            f"{path}: {group}/features has {len(bad)} row(s) with NaN or inf values (rows {shown}). "
            f"The detector produced non-finite features: check the checkpoint, then {REGENERATE}"
        )


def _read_group(path: Path, f: h5py.File, group: str, columns: dict, feature_dim: int) -> dict[str, np.ndarray]:
    if group not in f or not isinstance(f[group], h5py.Group):
        raise VspaError(f"{path}: group '{group}' is missing; this is not a complete memory file. {REGENERATE}")
    g = f[group]
    out = {}
    for name, (dtype, shape) in columns.items():
        if name not in g:
            raise VspaError(f"{path}: dataset '{group}/{name}' is missing. {REGENERATE}")
        trailing = (feature_dim,) if shape is None else shape
        if g[name].shape[1:] != tuple(trailing):
            what = "feature dimension" if shape is None else "shape"
            raise VspaError(
                f"{path}: '{group}/{name}' has {what} {g[name].shape[1:]}, expected {tuple(trailing)} "
                f"(attribute feature_dim={feature_dim}). {REGENERATE}"
            )
        out[name] = np.asarray(g[name][()], dtype=dtype)
    lengths = {name: len(a) for name, a in out.items()}
    if len(set(lengths.values())) > 1:
        raise VspaError(f"{path}: the datasets of group '{group}' have different lengths {lengths}. {REGENERATE}")
    return out


def open_memory(path: str | Path, expected_dim: int | None = None) -> MemoryBank:
    """Load and validate a memory file; every problem is a VspaError naming the file and the fix.

    Checks: the file exists and is a readable (not truncated) HDF5 file, the format version is known,
    every group and dataset is present with the attribute's feature dimension (and ``expected_dim`` when
    given: the detector's embedding size), all features are finite, labels lie in 1..C and every class
    of ``class_names`` has at least one foreground entry, and there is at least one background entry.
    """
    path = Path(path)
    if not path.exists():
        raise VspaError(f"{path}: memory file not found. Create it with `dvc repro extract_memory subsample`.")
    if not h5py.is_hdf5(path):
        raise VspaError(f"{path}: not an HDF5 file (wrong path, or the file is corrupt). {REGENERATE}")
    try:
        with h5py.File(path, "r") as f:
            attrs = _read_attrs(f)
            version = attrs.get("format_version")
            if version != FORMAT_VERSION:
                raise VspaError(
                    f"{path}: memory format version {version!r} is not supported (this vspa reads version "
                    f"{FORMAT_VERSION}). {REGENERATE}"
                )
            if "feature_dim" not in attrs:
                raise VspaError(f"{path}: attribute 'feature_dim' is missing. {REGENERATE}")
            dim = int(attrs["feature_dim"])
            if expected_dim is not None and dim != expected_dim:
                raise VspaError(
                    f"{path}: feature dimension {dim} does not match the detector's embedding size "
                    f"{expected_dim}. The memory was extracted with another model: {REGENERATE}"
                )
            index = "index" in f.get("fg", {})
            fg = _read_group(path, f, "fg", {**FG_COLUMNS, **(INDEX_COLUMN if index else {})}, dim)
            bg = _read_group(path, f, "bg", {**BG_COLUMNS, **(INDEX_COLUMN if index else {})}, dim)
    except OSError as exc:
        raise VspaError(f"{path}: cannot read the HDF5 file, it is truncated or corrupt ({exc}). {REGENERATE}") from exc
    _nonfinite_rows(path, "fg", fg["features"])
    _nonfinite_rows(path, "bg", bg["features"])
    names = attrs.get("class_names")
    if not names:
        raise VspaError(f"{path}: attribute 'class_names' is missing or empty. {REGENERATE}")
    labels = fg["labels"]
    outside = (labels < 1) | (labels > len(names))
    if outside.any():
        raise VspaError(
            f"{path}: {int(outside.sum())} foreground label(s) outside 1..{len(names)} "
            f"(first at row {int(np.flatnonzero(outside)[0])}). {REGENERATE}"
        )
    counts = np.bincount(labels, minlength=len(names) + 1)[1:]
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise VspaError(
            f"{path}: class(es) {', '.join(repr(n) for n in empty)} have no foreground entries, so retrieval "
            f"for them is impossible. Use extract_memory.keep: all (or a better source model), then rerun "
            f"`dvc repro extract_memory subsample`."
        )
    if len(bg["features"]) == 0:
        raise VspaError(f"{path}: the background memory is empty (no images were extracted). {REGENERATE}")
    return MemoryBank(
        fg_features=fg["features"],
        fg_labels=labels,
        fg_image_ids=fg["image_ids"],
        fg_object_ids=fg["object_ids"],
        fg_boxes=fg["boxes"],
        bg_features=bg["features"],
        bg_image_ids=bg["image_ids"],
        attrs=attrs,
        fg_index=fg.get("index"),
        bg_index=bg.get("index"),
        path=path,
    )
