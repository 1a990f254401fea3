"""KITTI object detection (2D boxes of the training set; the test set has no labels).

Layout (the dataset folder, e.g. ``kitti``, from data_object_image_2.zip and data_object_label_2.zip)::

    training/image_2/<id>.png
    training/label_2/<id>.txt     one object per line: type truncated occluded alpha left top right bottom
                                  h w l x y z rotation_y [score]

``class_map`` maps KITTI types to the scenario's class names (default ``{"Car": "car"}``); ``DontCare``
regions and unmapped types are dropped (counted). ``left top right bottom`` are continuous pixel
coordinates, so the COCO box is ``[left, top, right - left, bottom - top]``, clipped to the image.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

from vspa.data.importers import (
    ImageRecord,
    ImportedSplit,
    ObjectRecord,
    clip_box,
    image_size,
    import_split,
    layout_error,
    missing_files_error,
    progress,
    require_dir,
)
from vspa.utils import VspaError

KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

LAYOUT = """\
{name}/
  training/image_2/<id>.png
  training/label_2/<id>.txt   (type truncated occluded alpha left top right bottom h w l x y z rotation_y)
"""


def _check_class_map(class_map: dict, classes: Sequence[str]) -> dict[str, str]:
    if not isinstance(class_map, dict) or not class_map:
        raise VspaError(f"kitti: class_map must map KITTI types to class names, e.g. {{Car: car}}; got {class_map!r}.")
    unknown = [t for t in class_map if t not in KITTI_TYPES]
    if unknown:
        raise VspaError(
            f"kitti: unknown KITTI type(s) {', '.join(map(str, unknown))} in class_map. KITTI types: "
            f"{', '.join(KITTI_TYPES)} (DontCare regions are always dropped)."
        )
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise VspaError(f"kitti: classes must be a non-empty list of distinct class names, got {classes!r}.")
    unmapped = [c for c in classes if c not in class_map.values()]
    if unmapped:
        raise VspaError(
            f"kitti: no KITTI type maps to {', '.join(unmapped)} in class_map {class_map}. Add one, e.g. "
            f"Pedestrian: person."
        )
    return dict(class_map)


def _parse_labels(
    path: Path, width: int, height: int, class_map: dict[str, str], classes: Sequence[str], stats: Counter
) -> list[ObjectRecord]:
    objects = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise VspaError(
                f"{path}: line {line_no} has {len(fields)} fields; a KITTI label line has 15 (type truncated "
                f"occluded alpha left top right bottom h w l x y z rotation_y) or 16 (with score). Fix the line."
            )
        kitti_type = fields[0]
        if kitti_type == "DontCare":
            stats["dropped_dontcare"] += 1
            continue
        name = class_map.get(kitti_type)
        if name is None or name not in classes:
            stats["dropped_out_of_class"] += 1
            continue
        try:
            left, top, right, bottom = (float(v) for v in fields[4:8])
        except ValueError as exc:
            raise VspaError(
                f"{path}: line {line_no}: the box fields 5-8 are not numbers ({exc}). Fix the line."
            ) from exc
        bbox = clip_box(left, top, right, bottom, width, height, stats)
        if bbox is not None:
            objects.append(ObjectRecord(name, bbox))
    return objects


def read_kitti(root, split: str, classes: Sequence[str] = ("car",), class_map: dict | None = None) -> ImportedSplit:
    """The labelled KITTI images (``split``: train or training; every image of ``training/``)."""
    root = Path(root).expanduser().absolute()
    class_map = _check_class_map({"Car": "car"} if class_map is None else class_map, classes)
    classes = list(classes)
    if split not in ("train", "training"):
        raise VspaError(f"kitti: split '{split}' has no labels; KITTI labels only training/. Use split: train.")
    expected = LAYOUT.format(name=root.name or root)
    fix = "Fix: point dir at the KITTI folder that holds training/ (data_object_image_2 + data_object_label_2)."
    require_dir(root, "kitti", root, expected, fix=fix)
    img_dir = require_dir(root / "training" / "image_2", "kitti", root, expected, marker="training", fix=fix)
    label_dir = require_dir(root / "training" / "label_2", "kitti", root, expected, marker="training", fix=fix)
    labels = sorted(label_dir.glob("*.txt"))
    if not labels:
        raise layout_error("kitti", root, "no label file in 'training/label_2/'", expected, fix=fix)
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [f"training/image_2/{p.stem}.png" for p in labels if p.stem not in images]
    if missing:
        raise missing_files_error("kitti", root, "image(s)", missing, expected, fix)

    stats: Counter = Counter()
    records = []
    for label in progress(labels, f"kitti {split}"):
        path = images[label.stem]
        width, height = image_size(path)
        records.append(ImageRecord(path, width, height, _parse_labels(label, width, height, class_map, classes, stats)))
    return ImportedSplit("kitti", split, root, classes, records, stats)


def import_kitti(root, split: str, out_dir, **options) -> dict:
    """Import KITTI training. Options: ``classes`` (default car), ``class_map`` (default Car: car),
    ``copy_images``, ``drop_empty``."""
    return import_split(read_kitti, root, split, out_dir, **options)
