"""Importers: public detection datasets -> the project's COCO-style split folders.

Each importer reads one dataset in its published layout and writes ``<out_dir>/annotations.json`` in the
format of docs/architecture.md. Images are not copied: ``file_name`` is relative to the top-level
``image_root`` (the dataset folder, absolute), unless ``copy_images=True`` copies them into
``<out_dir>/images/``.

- ``import_<name>(root, split, out_dir, **options) -> summary`` for every name in ``IMPORTERS``;
  ``read_<name>(root, split, **options) -> ImportedSplit`` (``READERS``) does the reading alone.
- ``prepare_scenario(prepare_cfg, data_root, out_dir)`` builds the four splits of a real-data scenario
  (``prepare.source: import``) from the ``prepare.splits`` section of its preset.
- ``require_pretrained(model_cfg, scenario)`` stops a real-data scenario that has no ImageNet weights.

Boxes are COCO ``[x, y, w, h]`` in continuous pixel coordinates: a box covering the pixel columns
``x0..x1`` (inclusive) has ``x = x0, w = x1 - x0 + 1``. VOC's 1-based inclusive corners therefore become
``x = xmin - 1, w = xmax - xmin + 1`` (as detectron2 reads them); KITTI's corners are already continuous.
Boxes are clipped to the image; a box with no area left is dropped and counted.

The shared helpers come first in this file because the importer modules import them; the importers and
the registry follow.

Size (~560 lines, over the project's ~400): the shared helpers every importer module imports, the registry and
the scenario builder; the per-dataset readers are in their own modules of this package.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from vspa.data import SPLITS, split_info
from vspa.utils import VspaError, atomic_path

GENERATOR = "vspa-import/1"


# --------------------------------------------------------------------------- records


@dataclass
class ObjectRecord:
    """One kept object: class name, COCO box ``(x, y, w, h)`` in pixels, ``iscrowd`` 1 = ignored in evaluation."""

    category: str
    bbox: tuple[float, float, float, float]
    iscrowd: int = 0


@dataclass
class ImageRecord:
    path: Path  # absolute
    width: int
    height: int
    objects: list[ObjectRecord] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)  # extra image fields written to the COCO image entry (e.g. fog_beta)


@dataclass
class ImportedSplit:
    """What a reader found: the images with their kept objects and counts of what it dropped or clipped."""

    dataset: str
    split: str
    root: Path
    classes: list[str]
    images: list[ImageRecord]
    stats: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------- shared helpers


def _listing(folder: Path, limit: int = 12) -> str:
    if not folder.exists():
        return "(the folder does not exist)"
    if not folder.is_dir():
        return "(not a folder)"
    entries = sorted(folder.iterdir())
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f" ... and {len(entries) - limit} more" if len(entries) > limit else ""
    return (", ".join(names) + more) if names else "(empty)"


def _find_nested(root: Path, marker: str, depth: int = 2) -> list[Path]:
    """Sub-folders of ``root`` (up to ``depth`` levels down) that contain ``marker``: likely the intended root."""

    def subdirs(folder: Path) -> list[Path]:
        try:
            return [c for c in sorted(folder.iterdir()) if c.is_dir() and not c.name.startswith(".")]
        except OSError:  # unreadable: nothing to suggest there
            return []

    found: list[Path] = []
    frontier = [root] if root.is_dir() else []
    for _ in range(depth):
        frontier = [c for f in frontier for c in subdirs(f)]
        found += [c for c in frontier if (c / marker).exists()]
    return found[:3]


def layout_error(
    dataset: str, root: Path, problem: str, expected: str, marker: str | None = None, fix: str = ""
) -> VspaError:
    """A VspaError naming what is missing, printing the expected tree, what was found and a likely fix."""
    root = Path(root)
    lines = [f"{dataset} at {root}: {problem}", "Expected layout:"]
    lines += ["  " + line for line in expected.strip("\n").splitlines()]
    shown = root
    while not shown.exists() and shown.parent != shown:  # list the nearest folder that exists
        shown = shown.parent
    lines.append(f"Found in {shown}: {_listing(shown)}")
    if marker and not (root / marker).exists():
        nested = _find_nested(root, marker)
        if nested:
            lines.append("Did you mean " + " or ".join(str(p) for p in nested) + "?")
    if fix:
        lines.append(fix)
    return VspaError("\n".join(lines))


def require_dir(
    folder: Path, dataset: str, root: Path, expected: str, marker: str | None = None, fix: str = ""
) -> Path:
    if not folder.is_dir():
        rel = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
        what = "the dataset folder does not exist" if folder == root else f"missing folder '{rel}/'"
        raise layout_error(dataset, root, what, expected, marker, fix)
    return folder


def missing_files_error(
    dataset: str, root: Path, kind: str, missing: Sequence[str], expected: str, fix: str = ""
) -> VspaError:
    shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
    return layout_error(dataset, root, f"missing {kind}: {shown}", expected, fix=fix)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header (PIL reads no pixels)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError) as exc:
        raise VspaError(
            f"{path}: cannot read the image ({exc}). Re-download the file, or remove it from the split."
        ) from exc


def clip_box(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int, stats: Counter
) -> tuple[float, float, float, float] | None:
    """Corners in continuous pixels -> clipped COCO ``(x, y, w, h)``; None (counted) when no area is left."""
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if cx1 <= cx0 or cy1 <= cy0:
        stats["dropped_degenerate"] += 1
        return None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        stats["clipped_boxes"] += 1
    return (cx0, cy0, cx1 - cx0, cy1 - cy0)


def check_classes(classes: Iterable[str], known: Sequence[str], dataset: str, option: str = "classes") -> list[str]:
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise VspaError(f"{dataset}: {option} must be a non-empty list of distinct class names, got {classes!r}.")
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise VspaError(
            f"{dataset}: unknown class name(s) {', '.join(unknown)} in {option}. {dataset} has: {', '.join(known)}."
        )
    return classes


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterator:
    """A tqdm progress bar that hides itself off a TTY."""
    return iter(tqdm(items, desc=desc, total=total, unit="img", disable=None))


def _copy_image(src: Path, dst: Path) -> None:
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_split(
    images: list[ImageRecord],
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    info: dict,
    *,
    copy_images: bool = False,
    drop_empty: bool = False,
    stats: Counter | None = None,
    object_id_offset: int = 0,
) -> dict:
    """Write ``<out_dir>/annotations.json`` for ``images``; return a summary.

    ``drop_empty`` drops images without a non-crowd object (detectron2's default for training sets). Category
    ids are ``1..C`` in the order of ``classes``; image and annotation ids count from 0 in the given order;
    ``object_id`` is ``object_id_offset`` + the annotation id. ``image_root`` is the deepest folder that holds
    every image. The summary has the keys of the synthetic benchmark's (``images``, ``objects``,
    ``per_class``) plus ``crowd_regions`` (iscrowd annotations), ``image_root``, ``classes_without_objects``
    and ``stats`` (what the reader dropped or clipped over the whole dataset split it read, i.e. before a
    scenario's ``sample`` / ``exclude``; ``dropped_empty_images`` and ``excluded_held_out`` are exact).
    """
    from vspa.data.coco import write_coco

    out_dir = Path(out_dir)
    stats = Counter(stats or {})
    if drop_empty:
        kept = [r for r in images if any(not o.iscrowd for o in r.objects)]
        stats["dropped_empty_images"] += len(images) - len(kept)
        images = kept
    if not images:
        raise VspaError(
            f"{out_dir}: no image left to write ({dict(stats)}). Check the split's dataset folder, its classes "
            f"and drop_empty."
        )
    repeated = [str(p) for p, n in Counter(r.path for r in images).items() if n > 1]
    if repeated:
        raise VspaError(
            f"{out_dir}: {len(repeated)} image(s) listed twice, e.g. {repeated[0]}. A dataset folder is probably "
            f"listed twice in the split's dir, or its split list repeats ids; remove the duplicate."
        )
    root = Path(os.path.commonpath([str(r.path.parent) for r in images]))
    cat_ids = {name: i + 1 for i, name in enumerate(classes)}
    coco_images, coco_anns = [], []
    per_class: Counter = Counter()
    ignored = 0
    desc = f"write {out_dir.name}" + (" (copying images)" if copy_images else "")
    for image_id, rec in enumerate(progress(images, desc, total=len(images))):
        rel = rec.path.relative_to(root).as_posix()
        if copy_images:
            _copy_image(rec.path, out_dir / "images" / rel)
            rel = f"images/{rel}"
        coco_images.append({"id": image_id, "file_name": rel, "width": rec.width, "height": rec.height, **rec.attrs})
        for obj in rec.objects:
            ann_id = len(coco_anns)
            x, y, w, h = (float(v) for v in obj.bbox)
            coco_anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat_ids[obj.category],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(obj.iscrowd),
                    "object_id": object_id_offset + ann_id,
                }
            )
            if obj.iscrowd:
                ignored += 1
            else:
                per_class[obj.category] += 1
    categories = [{"id": cat_ids[name], "name": name} for name in classes]
    json_path = out_dir / "annotations.json"
    image_root = None if copy_images else str(root)
    write_coco(json_path, coco_images, coco_anns, categories, info, image_root=image_root)
    objects = sum(per_class.values())
    return {
        "images": len(coco_images),
        "objects": objects,
        "per_class": {name: per_class[name] for name in classes},
        "objects_per_image": round(objects / len(coco_images), 3),
        "crowd_regions": ignored,
        "image_root": image_root,
        "classes_without_objects": [name for name in classes if per_class[name] == 0],
        "stats": dict(sorted(stats.items())),
    }


def import_split(read, root, split, out_dir, copy_images: bool = False, drop_empty: bool = False, **options) -> dict:
    """Read one dataset split with ``read`` and write it to ``out_dir`` (what every ``import_<name>`` does)."""
    allowed = [name for name in inspect.signature(read).parameters if name not in ("root", "split")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise VspaError(
            f"{read.__name__.removeprefix('read_')} importer: unknown option(s) {', '.join(unknown)}. "
            f"Known: {', '.join(['copy_images', 'drop_empty', *allowed])}."
        )
    part = read(root, split, **options)
    info = {"dataset": part.dataset, "dataset_split": part.split, "dataset_dir": str(part.root), "generator": GENERATOR}
    return write_split(
        part.images, part.classes, out_dir, info, copy_images=copy_images, drop_empty=drop_empty, stats=part.stats
    )


# --------------------------------------------------------------------------- importers (import the helpers above)

from vspa.data.importers.cityscapes import (  # noqa: E402
    CITYSCAPES_CLASSES,
    import_cityscapes,
    import_foggy_cityscapes,
    read_cityscapes,
    read_foggy_cityscapes,
)
from vspa.data.importers.kitti import import_kitti, read_kitti  # noqa: E402
from vspa.data.importers.voc import (  # noqa: E402
    COMIC2K_CLASSES,
    VOC_CLASSES,
    import_comic2k,
    import_sim10k,
    import_voc,
    read_comic2k,
    read_sim10k,
    read_voc,
)

__all__ = [
    "CITYSCAPES_CLASSES",
    "COMIC2K_CLASSES",
    "IMPORTERS",
    "READERS",
    "VOC_CLASSES",
    "ImageRecord",
    "ImportedSplit",
    "ObjectRecord",
    "import_cityscapes",
    "import_comic2k",
    "import_foggy_cityscapes",
    "import_kitti",
    "import_sim10k",
    "import_voc",
    "prepare_scenario",
    "read_cityscapes",
    "read_comic2k",
    "read_foggy_cityscapes",
    "read_kitti",
    "read_sim10k",
    "read_voc",
    "require_pretrained",
    "write_split",
]

IMPORTERS = {
    "sim10k": import_sim10k,
    "cityscapes": import_cityscapes,
    "foggy_cityscapes": import_foggy_cityscapes,
    "kitti": import_kitti,
    "voc": import_voc,
    "comic2k": import_comic2k,
}
READERS = {
    "sim10k": read_sim10k,
    "cityscapes": read_cityscapes,
    "foggy_cityscapes": read_foggy_cityscapes,
    "kitti": read_kitti,
    "voc": read_voc,
    "comic2k": read_comic2k,
}


# --------------------------------------------------------------------------- scenarios

SPEC_KEYS = ("importer", "dir", "split", "sample", "exclude", "drop_empty")


@dataclass
class _SplitSpec:
    importer: str
    dirs: list[Path]
    split: str
    sample: int | None
    exclude: str | None
    drop_empty: bool
    options: dict


def _reader_options(importer: str) -> list[str]:
    params = inspect.signature(READERS[importer]).parameters
    return [name for name in params if name not in ("root", "split", "classes")]


def _parse_spec(name: str, spec, data_root: Path) -> _SplitSpec:
    where = f"params.yaml: prepare.splits.{name}"
    if not isinstance(spec, dict):
        raise VspaError(f"{where} must be a mapping with keys importer, dir, split (see docs/scenarios.md).")
    importer = spec.get("importer")
    if importer not in READERS:
        raise VspaError(f"{where}.importer = {importer!r}: choose one of {', '.join(READERS)}.")
    allowed = _reader_options(importer)
    unknown = sorted(set(spec) - set(SPEC_KEYS) - set(allowed))
    if unknown:
        hint = " (the label space is prepare.classes, shared by all splits)" if "classes" in unknown else ""
        raise VspaError(
            f"{where}: unknown key(s) {', '.join(unknown)}{hint}. Known: {', '.join(SPEC_KEYS + tuple(allowed))}."
        )
    dirs = spec.get("dir")
    dirs = [dirs] if isinstance(dirs, str) else dirs
    if not dirs or not isinstance(dirs, list) or not all(isinstance(d, str) and d for d in dirs):
        raise VspaError(f"{where}.dir must be a folder (relative to data.root) or a list of folders, got {dirs!r}.")
    if not isinstance(spec.get("split"), str):
        raise VspaError(f"{where}.split must be the dataset's split name, e.g. train, got {spec.get('split')!r}.")
    sample = spec.get("sample")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample <= 0):
        raise VspaError(f"{where}.sample must be a positive number of images or null, got {sample!r}.")
    exclude = spec.get("exclude")
    if exclude is not None and (exclude not in SPLITS or exclude == name):
        raise VspaError(f"{where}.exclude must name another split ({', '.join(s for s in SPLITS if s != name)}).")
    options = {k: v for k, v in spec.items() if k in allowed}
    for key, value in options.items():
        if key.endswith("_root") and value is not None:
            options[key] = data_root / Path(value).expanduser()
    return _SplitSpec(
        importer,
        [data_root / Path(d).expanduser() for d in dirs],
        spec["split"],
        sample,
        exclude,
        bool(spec.get("drop_empty", False)),
        options,
    )


def _sample(images: list[ImageRecord], n: int, seed: int, where: str) -> list[ImageRecord]:
    if n > len(images):
        raise VspaError(f"{where}.sample = {n} but the dataset split has only {len(images)} images. Lower it.")
    keep = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    return [images[i] for i in keep]


def prepare_scenario(
    prepare_cfg: dict, data_root: str | os.PathLike, out_dir: str | os.PathLike, scenario: str | None = None
) -> dict[str, dict]:
    """Build ``<out_dir>/{source_train,source_test,target_train,target_test}/annotations.json``.

    ``prepare_cfg`` is the effective ``prepare`` section. Keys read: ``classes`` (the label space, in
    category-id order), ``splits`` (one spec per split, below), ``copy_images`` (default false) and
    ``seed`` (default 0, for ``sample``). A split spec has ``importer`` (a key of ``READERS``), ``dir``
    (folder, or list of folders whose images are concatenated, relative to ``data_root``), ``split`` (the
    dataset's split name), optional ``sample: N`` (a seeded random subset of N images), ``exclude: <split>``
    (drop the images that the named split was drawn from, before its drop_empty: a held-out slice),
    ``drop_empty`` (default false) and the importer's own options (e.g. ``beta`` for foggy_cityscapes).
    Everything is read and checked before the first file is written. Returns a summary per split.
    """
    data_root = Path(data_root).expanduser().absolute()
    classes = prepare_cfg.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise VspaError(f"params.yaml: prepare.classes must be a non-empty list of class names, got {classes!r}.")
    splits = prepare_cfg.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        got = sorted(splits) if isinstance(splits, dict) else splits
        raise VspaError(f"params.yaml: prepare.splits must define exactly {', '.join(SPLITS)}; got {got!r}.")
    if not data_root.is_dir():
        raise VspaError(
            f"data.root = {data_root}: folder not found. Pass the folder that holds the datasets, e.g. "
            f"-S data.root=/datasets (see docs/scenarios.md for the layout)."
        )
    seed = int(prepare_cfg.get("seed") or 0)
    specs = {name: _parse_spec(name, splits[name], data_root) for name in SPLITS}
    for name, spec in specs.items():
        if spec.exclude and specs[spec.exclude].exclude:
            raise VspaError(
                f"params.yaml: prepare.splits.{name}.exclude = {spec.exclude}, which itself has an exclude. "
                f"Exclude only a split that is drawn directly from its dataset."
            )

    records: dict[str, list[ImageRecord]] = {}
    stats: dict[str, Counter] = {}
    for name, spec in specs.items():
        images: list[ImageRecord] = []
        stats[name] = Counter()
        for root in spec.dirs:
            try:
                part = READERS[spec.importer](root, spec.split, classes=classes, **spec.options)
            except VspaError as exc:
                raise VspaError(f"params.yaml: prepare.splits.{name} (data.root = {data_root}): {exc}") from exc
            images += part.images
            stats[name].update(part.stats)
        if spec.sample is not None:
            images = _sample(images, spec.sample, seed, f"params.yaml: prepare.splits.{name}")
        records[name] = images
    for name, spec in specs.items():
        if spec.exclude:
            held_out = {r.path for r in records[spec.exclude]}
            kept = [r for r in records[name] if r.path not in held_out]
            stats[name]["excluded_held_out"] += len(records[name]) - len(kept)
            records[name] = kept

    from vspa.data.synth import OBJECT_ID_SPLIT_STRIDE  # object ids unique over the four splits, as synth's

    summaries = {}
    for code, (name, spec) in enumerate(specs.items()):
        info = split_info(
            scenario,
            name,
            seed=seed,
            generator=GENERATOR,
            dataset=spec.importer,
            dataset_split=spec.split,
            dataset_dirs=[str(d) for d in spec.dirs],
            sample=spec.sample,
            exclude=spec.exclude,
        )
        summaries[name] = write_split(
            records[name],
            classes,
            Path(out_dir) / name,
            info,
            copy_images=bool(prepare_cfg.get("copy_images", False)),
            drop_empty=spec.drop_empty,
            stats=stats[name],
            object_id_offset=code * OBJECT_ID_SPLIT_STRIDE,
        )
    return summaries


# --------------------------------------------------------------------------- pretrained weights

_WEIGHTS = {
    "resnet50": ("resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101": ("resnet101", "ResNet101_Weights.IMAGENET1K_V1"),
    "vgg16": ("vgg16", "VGG16_Weights.IMAGENET1K_V1"),
}


def require_pretrained(model_cfg: dict, scenario: str, path: str = "params.yaml") -> Path | None:
    """The ImageNet weights file of a real-data scenario, or a VspaError saying how to obtain it.

    ``model_cfg`` is the effective ``model`` section. A real-data scenario (preset ``prepare.source:
    import``) with an ImageNet backbone must have ``model.pretrained_weights`` pointing at an existing file:
    the paper starts from ImageNet weights and nothing is downloaded. For other scenarios the path (or
    None) is returned unchecked; the backbone loader checks a given file. ``path`` names the params file in
    the message. The training stages call this unless ``model.from_scratch`` is true.
    """
    from vspa.config import load_preset

    backbone = model_cfg.get("backbone")
    value = model_cfg.get("pretrained_weights")
    real = (load_preset(scenario).get("prepare") or {}).get("source") == "import"
    if not real or backbone not in _WEIGHTS:
        return Path(value).expanduser() if value else None
    weights = Path(value).expanduser() if value else None
    if weights is not None and weights.is_file():
        return weights
    fn, enum = _WEIGHTS[backbone]
    problem = (
        "model.pretrained_weights is null" if weights is None else f"model.pretrained_weights = {weights}: no such file"
    )
    name = f"{fn}-imagenet1k-v1.pth"
    raise VspaError(
        f"{path}: scenario {scenario} starts the {backbone} backbone from ImageNet weights (as the paper does), but "
        f"{problem}. The pipeline never downloads weights. On a machine with network access run\n"
        f'  python -c "import torch, torchvision; m = torchvision.models.{fn}(weights=torchvision.models.{enum}); '
        f"torch.save(m.state_dict(), '{name}')\"\n"
        f'copy {name} here and rerun with -S model.pretrained_weights=/path/to/{name} (README: "Real datasets", '
        f'"1. ImageNet weights"). To train from random weights on purpose, set -S model.from_scratch=true.'
    )
