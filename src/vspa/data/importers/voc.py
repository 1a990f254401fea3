"""Datasets in the Pascal VOC layout: Pascal VOC 2007/2012, Comic2k and Sim10k.

Layout (one dataset folder, e.g. ``VOCdevkit/VOC2007``, ``comic``, ``Sim10k``)::

    Annotations/<id>.xml           one XML per image: <size>, <object><name>, <difficult>, <bndbox>
    JPEGImages/<id>.jpg            the images (any extension PIL reads)
    ImageSets/Main/<split>.txt     one image id per line (not needed with split: all)

Objects whose class is not in ``classes`` are dropped (counted). ``difficult`` objects are kept with
``iscrowd = 1``: evaluation ignores them, as the VOC protocol does. Class names are compared in lower case.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Sequence

from vspa.data.importers import (
    ImageRecord,
    ImportedSplit,
    ObjectRecord,
    check_classes,
    clip_box,
    image_size,
    import_split,
    layout_error,
    missing_files_error,
    progress,
    require_dir,
)
from vspa.utils import VspaError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
COMIC2K_CLASSES = ("bicycle", "bird", "car", "cat", "dog", "person")
SIM10K_CLASSES = ("car", "motorbike", "person")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

LAYOUT = """\
{name}/
  Annotations/<id>.xml
  JPEGImages/<id>.jpg
  ImageSets/Main/{split}.txt   (one image id per line; not needed with split: all)
"""


def _image_ids(root: Path, split: str, dataset: str, expected: str, fix: str) -> list[str]:
    """The ids of ``split``: from ``ImageSets/Main/<split>.txt``, or every XML in Annotations/ for ``all``."""
    if split == "all":
        ids = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
        if not ids:
            raise layout_error(dataset, root, "no .xml file in 'Annotations/'", expected, fix=fix)
        return ids
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        lists = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        found = f" (split lists found: {', '.join(lists)})" if lists else ""
        raise layout_error(
            dataset,
            root,
            f"missing split list 'ImageSets/Main/{split}.txt'{found}",
            expected,
            marker="Annotations",
            fix=(fix + " " if fix else "")
            + "Use one of the listed splits, or split: all for every file in Annotations/.",
        )
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise VspaError(f"{list_file}: the split list is empty. Re-download the dataset's ImageSets/Main/ files.")
    return ids


def _parse_xml(
    xml_path: Path, image_path: Path, width: int, height: int, classes: Sequence[str], stats: Counter
) -> list[ObjectRecord]:
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as exc:
        raise VspaError(f"{xml_path}: not valid XML ({exc}). Re-download the annotations.") from exc
    size = tree.find("size")
    if size is not None:
        try:
            xml_w, xml_h = int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0))
        except ValueError:
            xml_w = xml_h = 0
        if xml_w > 0 and xml_h > 0 and (xml_w, xml_h) != (width, height):
            raise VspaError(
                f"{xml_path}: <size> says {xml_w}x{xml_h} but the image {image_path} is {width}x{height}; the boxes "
                f"would be misplaced. Re-download the matching image/annotation pair."
            )
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in classes:
            stats["dropped_out_of_class"] += 1
            continue
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            difficult = int(float((obj.findtext("difficult") or "0").strip() or 0))
        except (AttributeError, TypeError, ValueError) as exc:
            raise VspaError(
                f"{xml_path}: object {k} ('{name}') has no valid <bndbox> xmin/ymin/xmax/ymax or <difficult> "
                f"({exc}). Fix or remove the object."
            ) from exc
        bbox = clip_box(xmin - 1.0, ymin - 1.0, xmax, ymax, width, height, stats)
        if bbox is not None:
            objects.append(ObjectRecord(name, bbox, iscrowd=1 if difficult else 0))
    return objects


def _read_voc_layout(
    dataset: str, root, split: str, classes: Sequence[str], known: Sequence[str], fix: str
) -> ImportedSplit:
    root = Path(root).expanduser().absolute()
    classes = check_classes([str(c).lower() for c in classes], known, dataset)
    expected = LAYOUT.format(name=root.name or root, split=split if split != "all" else "<split>")
    require_dir(root, dataset, root, expected, fix=fix)
    ann_dir = require_dir(root / "Annotations", dataset, root, expected, marker="Annotations", fix=fix)
    img_dir = require_dir(root / "JPEGImages", dataset, root, expected, marker="JPEGImages", fix=fix)
    ids = _image_ids(root, split, dataset, expected, fix)
    xml_ids = {p.stem for p in ann_dir.glob("*.xml")}
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [f"Annotations/{i}.xml" for i in ids if i not in xml_ids]
    if missing:
        raise missing_files_error(dataset, root, "annotation file(s)", missing, expected, fix)
    missing = [f"JPEGImages/{i}.jpg" for i in ids if i not in images]
    if missing:
        raise missing_files_error(dataset, root, "image(s)", missing, expected, fix)

    stats: Counter = Counter()
    records = []
    for image_id in progress(ids, f"{dataset} {split}"):
        path = images[image_id]
        width, height = image_size(path)
        objects = _parse_xml(ann_dir / f"{image_id}.xml", path, width, height, classes, stats)
        records.append(ImageRecord(path, width, height, objects))
    return ImportedSplit(dataset, split, root, classes, records, stats)


def read_voc(root, split: str, classes: Sequence[str] = VOC_CLASSES) -> ImportedSplit:
    """Pascal VOC 2007 or 2012: ``root`` is ``VOCdevkit/VOC2007`` (or ``VOC2012``), ``split`` e.g. trainval, test."""
    return _read_voc_layout(
        "voc",
        root,
        split,
        classes,
        VOC_CLASSES,
        "Fix: point dir at VOCdevkit/VOC2007 or VOCdevkit/VOC2012 (the folder that holds Annotations/).",
    )


def read_comic2k(root, split: str, classes: Sequence[str] = COMIC2K_CLASSES) -> ImportedSplit:
    """Comic2k (Inoue et al. 2018): ``root`` is the extracted ``comic`` folder, ``split`` train or test."""
    return _read_voc_layout(
        "comic2k",
        root,
        split,
        classes,
        COMIC2K_CLASSES,
        "Fix: point dir at the extracted comic/ folder of the cross-domain-detection "
        "datasets (it holds Annotations/, ImageSets/, JPEGImages/).",
    )


def read_sim10k(root, split: str, classes: Sequence[str] = ("car",)) -> ImportedSplit:
    """Sim10k: ``root`` holds Annotations/ and JPEGImages/ (the 10k archives extract them under VOC2012/)."""
    return _read_voc_layout(
        "sim10k",
        root,
        split,
        classes,
        SIM10K_CLASSES,
        "Fix: point dir at the Sim10k folder that holds Annotations/ and JPEGImages/ "
        "(the archives extract them under VOC2012/).",
    )


def import_voc(root, split: str, out_dir, **options) -> dict:
    """Import a VOC split. Options: ``classes`` (default the 20 VOC classes), ``copy_images``, ``drop_empty``."""
    return import_split(read_voc, root, split, out_dir, **options)


def import_comic2k(root, split: str, out_dir, **options) -> dict:
    """Import a Comic2k split (train/test). Options: ``classes`` (default the 6), ``copy_images``, ``drop_empty``."""
    return import_split(read_comic2k, root, split, out_dir, **options)


def import_sim10k(root, split: str, out_dir, **options) -> dict:
    """Import Sim10k (split: a list name, or all). Options: ``classes`` (default car), ``copy_images``, ``drop_empty``."""
    return import_split(read_sim10k, root, split, out_dir, **options)
