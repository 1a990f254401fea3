"""COCO-style annotations: validation (``load_coco``), the detector's dataset, writing and hashing.

The layout is the one of docs/architecture.md. ``load_coco`` checks the whole file before a caller
writes anything, and reports every problem it finds (up to ``MAX_PROBLEMS``) in one ``VspaError`` that
names the JSON file, the item (image id, annotation id, file name) and what to change.

Class labels are contiguous ``1..C`` in the order of increasing category id; COCO category ids are mapped
with ``CocoData.cat_id_to_label`` / ``label_to_cat_id``. Crowd annotations (``iscrowd: 1``) are kept in
``CocoData`` but are not training targets: ``DetectionDataset`` returns them as ``ignore_boxes``.

Size (~440 lines, over the project's ~400): the validator is most of it (one checker per kind of record, so that
one error lists every problem); the dataset, writer and hash beside it are short and read the same records.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from vspa.utils import VspaError, sha256_file, write_json_atomic

MAX_PROBLEMS = 10
"""At most this many problems are listed in one error message (the total is always given)."""

BOX_TOLERANCE_PX = 1.0
"""A box may stick out of its image by this many pixels (rounding in exporters); it is clipped on load."""


@dataclass
class CocoData:
    """A validated annotation file.

    ``images``: the image records in file order. ``annotations_by_image``: image id -> its annotations
    (crowd ones included; every image id has an entry). ``categories``: class names, label ``k`` is
    ``categories[k - 1]``. ``root``: the folder that ``file_name`` is relative to.
    """

    json_path: Path
    root: Path
    info: dict
    categories: list[str]
    category_records: list[dict]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: dict[int, int]
    images: list[dict]
    annotations_by_image: dict[int, list[dict]] = field(default_factory=dict)

    def image_path(self, image: dict) -> Path:
        """Where the file of an image record lies."""
        return self.root / image["file_name"]

    @property
    def num_annotations(self) -> int:
        return sum(len(anns) for anns in self.annotations_by_image.values())


# --------------------------------------------------------------------------- validation helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _fail(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
    raise VspaError(f"{path}: {len(problems)} problem(s) in the annotations:\n{shown}{more}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise VspaError(f"{path}: annotation file not found. Check the path (or run the prepare stage).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VspaError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Fix the syntax or export the annotations again."
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise VspaError(f"{path}: cannot be read as UTF-8 text ({exc}). Check the file.") from exc
    if not isinstance(data, dict):
        raise VspaError(f"{path}: the top level must be a JSON object with 'images', 'annotations', 'categories'.")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise VspaError(f"{path}: missing top-level key '{key}'. Add it (a list, possibly empty).")
        if not isinstance(data[key], list):
            raise VspaError(f"{path}: top-level '{key}' must be a list, not {type(data[key]).__name__}.")
    return data


def _resolve_root(path: Path, data: dict, image_root: str | os.PathLike | None) -> Path:
    if image_root is not None:
        return Path(image_root)
    given = data.get("image_root")
    if given is None:
        return path.parent
    if not isinstance(given, str) or not given:
        raise VspaError(f"{path}: 'image_root' must be a folder path (string) or null, got {given!r}.")
    root = Path(given)
    return root if root.is_absolute() else path.parent / root


def _check_categories(records: list) -> tuple[list[str], list[str]]:
    problems, seen_ids, seen_names = [], set(), set()
    for i, cat in enumerate(records):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            problems.append(f"category #{i} ({cat!r}): needs an integer 'id' and a string 'name'")
            continue
        if cat["id"] in seen_ids:
            problems.append(f"category id={cat['id']} ('{cat['name']}'): duplicate category id; give each a unique id")
        if cat["name"] in seen_names:
            problems.append(f"category '{cat['name']}' (id={cat['id']}): duplicate name; merge or rename it")
        seen_ids.add(cat["id"])
        seen_names.add(cat["name"])
    if not records:
        problems.append("no categories: list the classes under 'categories' ({'id': 1, 'name': 'car'}, ...)")
    return problems, sorted(seen_names)


def _check_image_file(file_path: Path, item: str, width: int, height: int) -> str | None:
    if not file_path.is_file():
        return f"{item}: image file {file_path} not found; fix file_name or the image folder (image_root)"
    try:
        with Image.open(file_path) as im:
            size = im.size
            im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return f"{item}: image file {file_path} cannot be read as an image ({exc}); replace the file"
    if size != (width, height):
        return (
            f"{item}: image file {file_path} is {size[0]}x{size[1]} but the record says {width}x{height}; "
            "fix width/height"
        )
    return None


def _check_images(records: list, root: Path, check_files: bool) -> tuple[list[str], dict[int, dict]]:
    problems, by_id = [], {}
    for i, img in enumerate(records):
        if not isinstance(img, dict):
            problems.append(f"image #{i}: must be an object, got {img!r}")
            continue
        item = f"image id={img.get('id')!r} ({img.get('file_name', '?')})"
        if not _is_int(img.get("id")):
            problems.append(f"image #{i} ({img.get('file_name', '?')}): needs an integer 'id'")
            continue
        if img["id"] in by_id:
            problems.append(
                f"{item}: duplicate image id (also used by {by_id[img['id']].get('file_name')}); make ids unique"
            )
            continue
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            problems.append(f"{item}: needs a 'file_name' (path relative to the image folder)")
            continue
        if not (_is_int(img.get("width")) and _is_int(img.get("height")) and img["width"] > 0 and img["height"] > 0):
            problems.append(f"{item}: needs positive integer 'width' and 'height' (the image size in pixels)")
            continue
        by_id[img["id"]] = img
        if check_files:
            problem = _check_image_file(root / img["file_name"], item, img["width"], img["height"])
            if problem:
                problems.append(problem)
    return problems, by_id


def _box_problem(bbox: Any, width: int, height: int) -> str | None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return f"bbox {bbox!r} must be [x, y, width, height] with 4 finite numbers"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has a non-positive width or height; drop the annotation or fix the box"
    tol = BOX_TOLERANCE_PX
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol or x1 <= x0 or y1 <= y0:
        return (
            f"bbox {bbox} lies outside the {width}x{height} image (more than {tol:g} px); "
            "clip it to the image or fix the image size"
        )
    return None


def _check_annotations(records: list, images: dict[int, dict], cat_ids: set[int]) -> tuple[list[str], dict]:
    problems, seen, by_image = [], set(), {img_id: [] for img_id in images}
    for i, ann in enumerate(records):
        if not isinstance(ann, dict):
            problems.append(f"annotation #{i}: must be an object, got {ann!r}")
            continue
        if not _is_int(ann.get("id")):
            problems.append(f"annotation #{i}: needs an integer 'id'")
            continue
        item = f"annotation id={ann['id']}"
        if ann["id"] in seen:
            problems.append(f"{item}: duplicate annotation id; make ids unique")
            continue
        seen.add(ann["id"])
        missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if missing:
            problems.append(f"{item}: missing {', '.join(missing)}; every annotation needs image_id, category_id, bbox")
            continue
        img = images.get(ann["image_id"]) if _is_int(ann["image_id"]) else None
        if img is None:
            problems.append(
                f"{item}: image_id={ann['image_id']!r} is not in 'images'; add the image or drop the annotation"
            )
            continue
        item = f"{item} (image id={img['id']}, {img['file_name']})"
        if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
            problems.append(
                f"{item}: unknown category_id={ann['category_id']!r} (known: {sorted(cat_ids)}); "
                "add the category or fix the id"
            )
            continue
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), bool):
            problems.append(f"{item}: iscrowd must be 0 or 1, got {ann.get('iscrowd')!r}")
            continue
        problem = _box_problem(ann["bbox"], img["width"], img["height"])
        if problem:
            problems.append(f"{item}: {problem}")
            continue
        by_image[img["id"]].append(ann)
    return problems, by_image


def load_coco(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, check_images: bool = True
) -> CocoData:
    """Parse and validate a COCO-style annotation file; raise ``VspaError`` listing every problem.

    ``image_root`` overrides the file's own ``image_root`` (which, when relative, is relative to the
    JSON's folder); without either, ``file_name`` is relative to the JSON's folder. With ``check_images``
    every image file must exist, be readable and have the size its record gives.
    """
    path = Path(json_path)
    data = _read_json(path)
    root = _resolve_root(path, data, image_root)
    if check_images and not root.is_dir():
        raise VspaError(f"{path}: image folder {root} not found. Fix image_root (or the images path in params.yaml).")

    cat_problems, _ = _check_categories(data["categories"])
    _fail(path, cat_problems)
    cat_records = sorted(data["categories"], key=lambda c: c["id"])
    cat_id_to_label = {c["id"]: k for k, c in enumerate(cat_records, start=1)}

    img_problems, images = _check_images(data["images"], root, check_images)
    ann_problems, by_image = _check_annotations(data["annotations"], images, set(cat_id_to_label))
    _fail(path, img_problems + ann_problems)

    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return CocoData(
        json_path=path,
        root=root,
        info=info,
        categories=[c["name"] for c in cat_records],
        category_records=[{"id": c["id"], "name": c["name"]} for c in cat_records],
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id={k: cid for cid, k in cat_id_to_label.items()},
        images=list(images.values()),
        annotations_by_image=by_image,
    )


# --------------------------------------------------------------------------- torch dataset


def _xyxy(bbox: list[float], width: int, height: int) -> list[float]:
    """COCO [x, y, w, h] -> [x0, y0, x1, y1] clipped to the image (validated boxes stay non-empty)."""
    x, y, w, h = bbox
    return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]


def _boxes_tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


class DetectionDataset(torch.utils.data.Dataset):
    """Images and detection targets of one split.

    ``ds[i] -> (image, target)``: image FloatTensor[3, H, W] in [0, 1] (RGB); target ``boxes``
    FloatTensor[N, 4] xyxy pixels, ``labels`` Int64[N] in 1..C, ``image_id`` int, ``object_ids`` Int64[N]
    (-1 where the file has none), ``index`` int, and the crowd regions ``ignore_boxes`` FloatTensor[M, 4]
    with their ``ignore_labels`` Int64[M]. ``transform(image, target) -> (image, target)`` is applied last.

    ``cache_mb`` > 0 keeps decoded images (uint8, 3 bytes a pixel) in memory until that budget is used, so a
    training loop that reads every image many times decodes each once (images that do not fit are read from
    disk every time); the values returned are the same either way.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        transform: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]] | None = None,
        check_images: bool = True,
        cache_mb: float = 0.0,
    ):
        self.coco = load_coco(json_path, image_root=image_root, check_images=check_images)
        self.transform = transform
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_left = int(cache_mb * 2**20)
        self._cache_lock = threading.Lock()  # data threads (vspa.training.prefetch) fill the cache concurrently
        self.class_names = list(self.coco.categories)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.coco.images)

    def _read(self, img: dict) -> torch.Tensor:
        cached = self._cache.get(img["id"])
        if cached is None:
            cached = self._decode(img)
            with self._cache_lock:
                if img["id"] not in self._cache and cached.numel() <= self._cache_left:
                    self._cache[img["id"]] = cached
                    self._cache_left -= cached.numel()
        return cached.float().div_(255.0)

    def __getstate__(self) -> dict:  # a lock does not pickle (DataLoader workers under the spawn start method)
        state = dict(self.__dict__)
        state.pop("_cache_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    def _decode(self, img: dict) -> torch.Tensor:
        """The image file as a uint8 tensor ``[3, H, W]``."""
        path = self.coco.image_path(img)
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise VspaError(
                f"{self.coco.json_path}: image id={img['id']} ({path}) cannot be read ({exc}). "
                "Restore the file or run the prepare stage again."
            ) from exc
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def target(self, index: int) -> dict:
        """The target of item ``index`` without reading its image (no transform applied)."""
        img = self.coco.images[index]
        boxes, labels, object_ids, ignore, ignore_labels = [], [], [], [], []
        for ann in self.coco.annotations_by_image[img["id"]]:
            box = _xyxy(ann["bbox"], img["width"], img["height"])
            label = self.coco.cat_id_to_label[ann["category_id"]]
            if ann.get("iscrowd", 0):
                ignore.append(box)
                ignore_labels.append(label)
            else:
                boxes.append(box)
                labels.append(label)
                object_ids.append(int(ann.get("object_id", -1)))
        return {
            "boxes": _boxes_tensor(boxes),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(img["id"]),
            "object_ids": torch.tensor(object_ids, dtype=torch.int64),
            "index": int(index),
            "ignore_boxes": _boxes_tensor(ignore),
            "ignore_labels": torch.tensor(ignore_labels, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = self._read(self.coco.images[index])
        target = self.target(index)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images of different sizes apart: ``(list of images, list of targets)``."""
    return [item[0] for item in batch], [item[1] for item in batch]


# --------------------------------------------------------------------------- writing


def write_coco(
    path: str | os.PathLike,
    images: list[dict],
    annotations: list[dict],
    categories: list[dict],
    info: dict,
    image_root: str | os.PathLike | None = None,
) -> None:
    """Write an annotation file atomically, keys in the contract's order (``image_root`` as given)."""
    write_json_atomic(
        path,
        {
            "info": info,
            "image_root": None if image_root is None else str(image_root),
            "categories": categories,
            "images": images,
            "annotations": annotations,
        },
    )


def dataset_sha256(json_path: str | os.PathLike) -> str:
    """SHA-256 of an annotation file (its provenance hash; the images are referenced from it)."""
    path = Path(json_path)
    if not path.is_file():
        raise VspaError(f"{path}: annotation file not found. Run the prepare stage or fix the path.")
    return sha256_file(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    On an exception the temporary folder is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
