"""Cityscapes and Foggy Cityscapes: boxes from the gtFine instance-id maps.

Layout (the dataset folder, e.g. ``cityscapes``; Foggy Cityscapes' ``leftImg8bit_foggy`` sits beside
``leftImg8bit`` and uses Cityscapes' ``gtFine``)::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    leftImg8bit_foggy/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit_foggy_beta_<beta>.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png

In ``*_gtFine_instanceIds.png`` (16-bit) a pixel of an individually labelled object holds
``label_id * 1000 + k``; a pixel of a crowd region or of stuff holds the bare label id (< 1000). The
importer keeps the 8 detection classes (label ids 24..33 without 29 caravan and 30 trailer, which
Cityscapes ignores in evaluation); each instance id gives one box, the tight box of its pixels. Crowd
regions are ignored (counted), as are instances of classes outside ``classes``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from vspa.data.importers import (
    ImageRecord,
    ImportedSplit,
    ObjectRecord,
    check_classes,
    image_size,
    import_split,
    layout_error,
    missing_files_error,
    progress,
    require_dir,
)
from vspa.utils import VspaError

# Cityscapes label ids of the 8 detection classes (cityscapesscripts/helpers/labels.py).
CITYSCAPES_LABEL_IDS = {
    "person": 24,
    "rider": 25,
    "car": 26,
    "truck": 27,
    "bus": 28,
    "train": 31,
    "motorcycle": 32,
    "bicycle": 33,
}
CITYSCAPES_CLASSES = tuple(CITYSCAPES_LABEL_IDS)
FOGGY_BETAS = ("0.005", "0.01", "0.02")  # the three fog densities released with Foggy Cityscapes
LABELLED_SPLITS = ("train", "val")

LAYOUT = """\
{name}/
  {images}/{split}/<city>/<city>_<seq>_<frame>{suffix}
  gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png
"""


def instance_boxes(ids: np.ndarray, label_classes: dict[int, str], stats: Counter) -> list[ObjectRecord]:
    """Boxes of the instances in an instance-id map, sorted by instance id.

    ``label_classes`` maps the Cityscapes label ids to keep to class names. Values >= 1000 are instances
    (``label_id * 1000 + k``); values < 1000 (crowd regions, stuff) give no box, and crowd regions of a
    kept class are counted in ``stats['dropped_crowd']``; instances of other labels in
    ``stats['dropped_out_of_class']``.
    """
    ids = np.asarray(ids)
    small = ids[ids < 1000]
    present = np.bincount(small.ravel().astype(np.int64), minlength=1000) > 0 if small.size else np.zeros(1000, bool)
    stats["dropped_crowd"] += sum(int(present[label]) for label in label_classes)
    ys, xs = np.nonzero(ids >= 1000)
    if ys.size == 0:
        return []
    values = ids[ys, xs]
    order = np.argsort(values, kind="stable")
    values, ys, xs = values[order], ys[order], xs[order]
    uniq, starts = np.unique(values, return_index=True)
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    objects = []
    for value, a, b, c, d in zip(uniq.tolist(), x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist()):
        name = label_classes.get(value // 1000)
        if name is None:
            stats["dropped_out_of_class"] += 1
            continue
        # pixels a..c (inclusive) cover the continuous interval [a, c + 1]
        objects.append(ObjectRecord(name, (float(a), float(b), float(c - a + 1), float(d - b + 1))))
    return objects


def _read_instance_map(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            ids = np.asarray(im)
    except (OSError, SyntaxError) as exc:
        raise VspaError(f"{path}: cannot read the instance-id map ({exc}). Re-download gtFine.") from exc
    if ids.ndim != 2:
        raise VspaError(
            f"{path}: expected a single-channel 16-bit instance-id map, got an array of shape {ids.shape}. "
            f"Use the *_gtFine_instanceIds.png files of gtFine_trainvaltest.zip."
        )
    return ids


def _read(
    dataset: str, root, split: str, classes: Sequence[str], image_dir: str, suffixes: dict[str, str], gt_root
) -> ImportedSplit:
    """Read one split; ``suffixes`` maps a variant key (fog beta, or '' for clear) to the image file suffix."""
    root = Path(root).expanduser().absolute()
    gt_root = Path(gt_root).expanduser().absolute() if gt_root is not None else root
    classes = check_classes(classes, CITYSCAPES_CLASSES, dataset)
    if split not in LABELLED_SPLITS:
        raise VspaError(
            f"{dataset}: split '{split}' has no public instance labels. Use one of: {', '.join(LABELLED_SPLITS)}."
        )
    shown_suffix = next(iter(suffixes.values())) if len(suffixes) == 1 else "_leftImg8bit_foggy_beta_<beta>.png"
    expected = LAYOUT.format(name=root.name or root, images=image_dir, split=split, suffix=shown_suffix)
    if gt_root != root:
        expected += f"(gtFine/ under gt_root = {gt_root})\n"
    fix = "Fix: point dir at the folder that holds " + image_dir + "/ and gtFine/."
    require_dir(root, dataset, root, expected, fix=fix)
    img_split = require_dir(root / image_dir / split, dataset, root, expected, marker=image_dir, fix=fix)
    gt_split = require_dir(gt_root / "gtFine" / split, dataset, gt_root, expected, marker="gtFine", fix=fix)
    cities = sorted(d for d in img_split.iterdir() if d.is_dir())
    if not cities:
        raise layout_error(dataset, root, f"no city folder in '{image_dir}/{split}/'", expected, fix=fix)

    groups: dict[tuple[str, str], list[Path]] = {}  # (city, stem) -> image files (one per fog level)
    found: Counter = Counter()
    for city in cities:
        for path in sorted(city.iterdir()):
            for key, suffix in suffixes.items():
                if path.name.endswith(suffix):
                    groups.setdefault((city.name, path.name[: -len(suffix)]), []).append(path)
                    found[key] += 1
    absent = [suffixes[k] for k in suffixes if found[k] == 0]
    if absent:
        levels = [k for k in suffixes if found[k]]
        if levels:  # some fog levels are there, others not
            fix = (
                f"Only beta {', '.join(levels)} is there: set beta to it, or extract the full "
                f"leftImg8bit_trainvaltest_foggy.zip (all three levels)."
            )
        raise layout_error(
            dataset, root, f"no image named *{', *'.join(absent)} in '{image_dir}/{split}/<city>/'", expected, fix=fix
        )
    gt_files = {key: gt_split / key[0] / f"{key[1]}_gtFine_instanceIds.png" for key in groups}
    missing = [p.relative_to(gt_root).as_posix() for p in gt_files.values() if not p.is_file()]
    if missing:
        raise missing_files_error(
            dataset,
            gt_root,
            "instance-id map(s)",
            missing,
            expected,
            "gtFine_trainvaltest.zip has them; extract it beside " + image_dir + "/.",
        )

    label_classes = {CITYSCAPES_LABEL_IDS[name]: name for name in classes}
    stats: Counter = Counter()
    records = []
    for key in progress(groups, f"{dataset} {split}", total=len(groups)):
        ids = _read_instance_map(gt_files[key])
        objects = instance_boxes(ids, label_classes, stats)
        for path in groups[key]:
            variant = next(k for k, suffix in suffixes.items() if path.name.endswith(suffix))
            width, height = image_size(path)
            if (width, height) != (ids.shape[1], ids.shape[0]):
                raise VspaError(
                    f"{path}: the image is {width}x{height} but its instance map {gt_files[key]} is "
                    f"{ids.shape[1]}x{ids.shape[0]}. Re-download the matching files."
                )
            # Foggy Cityscapes: the fog level of each image, so an evaluation can report each level (evaluate.subsets)
            attrs = {"fog_beta": float(variant)} if variant else {}
            records.append(ImageRecord(path, width, height, list(objects), attrs))
    return ImportedSplit(dataset, split, root, classes, records, stats)


def _betas(beta) -> list[str]:
    """``0.02`` / ``"0.02"`` / ``[0.01, 0.02]`` / ``"all"`` -> the fog levels as written in the file names."""
    if beta == "all":
        return list(FOGGY_BETAS)
    values = beta if isinstance(beta, (list, tuple)) else [beta]
    out = []
    for value in values:
        match = [b for b in FOGGY_BETAS if _as_float(value) == float(b)]
        if not match:
            raise VspaError(
                f"foggy_cityscapes: beta = {value!r} is not a released fog level. Use 0.02 (the paper's), "
                f"0.01, 0.005, a list of them, or all."
            )
        out += [m for m in match if m not in out]
    if not out:
        raise VspaError("foggy_cityscapes: beta is an empty list. Use 0.02 (the paper's), a list, or all.")
    return out


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_cityscapes(root, split: str, classes: Sequence[str] = CITYSCAPES_CLASSES, gt_root=None) -> ImportedSplit:
    """Cityscapes ``leftImg8bit`` images of ``split`` (train/val); ``gt_root`` holds gtFine/ if not ``root``."""
    return _read("cityscapes", root, split, classes, "leftImg8bit", {"": "_leftImg8bit.png"}, gt_root)


def read_foggy_cityscapes(
    root, split: str, classes: Sequence[str] = CITYSCAPES_CLASSES, beta=0.02, gt_root=None
) -> ImportedSplit:
    """Foggy Cityscapes images of ``split`` at fog level(s) ``beta`` (0.02 default, or a list, or all).

    With several levels every scene appears once per level, with the same boxes.
    """
    suffixes = {b: f"_leftImg8bit_foggy_beta_{b}.png" for b in _betas(beta)}
    return _read("foggy_cityscapes", root, split, classes, "leftImg8bit_foggy", suffixes, gt_root)


def import_cityscapes(root, split: str, out_dir, **options) -> dict:
    """Import Cityscapes train/val. Options: ``classes`` (default the 8), ``gt_root``, ``copy_images``, ``drop_empty``."""
    return import_split(read_cityscapes, root, split, out_dir, **options)


def import_foggy_cityscapes(root, split: str, out_dir, **options) -> dict:
    """Import Foggy Cityscapes train/val. Options: ``beta`` (0.02 | 0.01 | 0.005 | list | all), ``classes``,
    ``gt_root``, ``copy_images``, ``drop_empty``."""
    return import_split(read_foggy_cityscapes, root, split, out_dir, **options)
