"""AugSim and FoggyAugSim: a source set whose objects' colour and orientation are controlled (paper 3.2).

``make_augsim`` copies a split and replaces ``round(fraction * N)`` images, chosen by ``seed`` (images with
objects first), by one of three variants, chosen at random per image:

- ``color``: every labelled object recoloured (:func:`recolor`: a 180-degree hue rotation; a grey object,
  which has no hue, gets its lightness inverted instead);
- ``color_flip``: recoloured and mirrored;
- ``flip``: mirrored only.

Only labelled objects change. With instance maps (``instance_file``) the change follows the masks: a
recolour touches exactly the mask's pixels, and a flip changes only pixels inside the union of an object's
mask and its mirrored mask; every other pixel is bit-identical. Without instance maps (boxes only, e.g.
Sim10k) the change is confined to the boxes.

The flip mirrors each object in place, about the vertical centre line of its own box, so the box is
unchanged and the mask is mirrored with the object. Where the mirrored object no longer covers a pixel of
its old mask, the true background behind the object is unknown; the pixel is filled with what mirroring
the whole box would put there, i.e. the original image at the mirrored position, which is background of
the same box (the same estimate that the boxes-only flip shows). Should that mirrored position belong to
another object, the nearest background pixel of the same row is used instead. A mirrored object paints
only over background and its own old pixels, never over another object; objects are processed far to
near (by the bottom edge of their box, the ground-plane depth cue), so where two mirrored objects want
the same background pixel the nearer one wins. Depth maps are moved with the pixels.

Each annotation keeps its ``id`` and ``object_id`` and gets ``augsim: {"variant": ...}`` (``none`` for the
untouched images; the image record gets the same field); a recoloured object's ``attributes.color`` and a
mirrored object's ``attributes.orientation`` (``side`` <-> ``side_mirrored``) are updated where present.

``make_variant_set`` applies one variant to every image: the pairing memory of
:mod:`vspa.adaptation.pairing` uses one such set per variant, so that the counterpart of each object in
each appearance exists. Because the transforms are deterministic, an AugSim image is bit-identical to the
same image in the variant set of its variant.

``make_foggy`` applies fixed-intensity fog (:func:`vspa.data.synth.apply_fog`) with the image's depth map
where there is one, else with :func:`ground_plane_depth`; annotations (and ids) are kept.

All outputs are written to a temporary folder renamed onto ``out_dir`` when complete.

Size (~540 lines, over the project's ~400): the transforms (recolour, in-place flip with its background fill) and the
three set builders share the per-object mask / box arrays and the side-file copying; apart, each builder would
need those private helpers exported. Split it if a second user of the transforms appears.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vspa.data.coco import CocoData, atomic_dir, load_coco, write_coco
from vspa.utils import VspaError

GENERATOR = "vspa-augsim/1"
VARIANTS = ("none", "color", "color_flip", "flip")
"""Every appearance of an object: original, recoloured, recoloured and mirrored, mirrored."""
CHANGED_VARIANTS = ("color", "color_flip", "flip")
"""The three variants an AugSim image is replaced by."""
VARIANT_FLAGS = {"none": (False, False), "color": (True, False), "color_flip": (True, True), "flip": (False, True)}
"""variant -> (recoloured, mirrored)."""
MIRRORED_ORIENTATION = {"side": "side_mirrored", "side_mirrored": "side"}
DEPTH_SCALE_M = 0.01
"""Depth PNGs hold centimetres."""
GREY_CHROMA = 64.0
"""Objects whose median chroma ``max - min`` (0-255) is below this are partly grey (:func:`color_weight`)."""


def variant_from_flags(color: bool, flip: bool) -> str:
    """The variant name of an appearance (inverse of ``VARIANT_FLAGS``)."""
    return {flags: name for name, flags in VARIANT_FLAGS.items()}[(bool(color), bool(flip))]


# --------------------------------------------------------------------------- pixel transforms


def recolor(pixels: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """The colour transform of uint8 RGB ``pixels [..., 3]``: a 180-degree hue rotation.

    Coloured pixels get their complementary hue, ``c' = max + min - c`` per pixel, which keeps lightness
    ``(max + min) / 2`` and saturation (shading survives; red -> cyan, yellow -> blue). A grey object has
    no hue to rotate and is its own complement, so for it the lightness is inverted instead
    (``c' = 255 - c``: white -> black). ``weight`` in [0, 1] blends the two,
    ``c' = rint(weight * complement + (1 - weight) * (255 - c))``; see :func:`color_weight`.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
        raise ValueError(f"recolor wants uint8 RGB [..., 3], got {pixels.dtype} {pixels.shape}")
    wide = pixels.astype(np.int16)
    complement = wide.max(axis=-1, keepdims=True) + wide.min(axis=-1, keepdims=True) - wide
    if weight >= 1.0:
        return complement.astype(np.uint8)
    return np.rint(weight * complement + (1.0 - weight) * (255 - wide)).astype(np.uint8)


def color_weight(object_pixels: np.ndarray) -> float:
    """The :func:`recolor` weight of one object from its pixels ``[K, 3]``: ``min(chroma / GREY_CHROMA, 1)``
    with the median chroma ``max - min``, so a coloured object is hue-rotated, a grey one lightness-inverted.

    One weight per object (not per pixel) keeps the object's texture: a per-pixel blend turns the sensor
    noise of a grey object into speckle.
    """
    if len(object_pixels) == 0:
        return 1.0
    wide = np.asarray(object_pixels, dtype=np.int16).reshape(-1, 3)
    chroma = float(np.median(wide.max(axis=1) - wide.min(axis=1)))
    return min(chroma / GREY_CHROMA, 1.0)


def object_color_weights(
    image: np.ndarray, instances: np.ndarray | None, instance_values: list[int] | None, count: int
) -> list[float]:
    """Per object, the :func:`recolor` weight: from its mask's pixels, or 1 (pure hue rotation) without
    masks, since the grey road inside a box would be inverted with the object."""
    if instances is None:
        return [1.0] * count
    return [color_weight(image[instances == value]) for value in instance_values]


def box_pixels(bbox, height: int, width: int) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` -> the pixel window ``(r0, r1, c0, c1)`` (end exclusive) it covers, clipped."""
    x, y, w, h = (float(v) for v in bbox)
    r0, r1 = max(int(math.floor(y)), 0), min(int(math.ceil(y + h)), height)
    c0, c1 = max(int(math.floor(x)), 0), min(int(math.ceil(x + w)), width)
    return r0, r1, c0, c1


def _far_to_near(bboxes: list) -> list[int]:
    """Indices of the objects ordered far to near: bottom edge of the box ascending (ties: list order)."""
    return sorted(range(len(bboxes)), key=lambda i: (float(bboxes[i][1]) + float(bboxes[i][3]), i))


def _nearest_background(background: np.ndarray, rows: np.ndarray, cols: np.ndarray, fallback: np.ndarray):
    """For each pixel, the column of the nearest background pixel in its row (``fallback`` if none)."""
    out = fallback.copy()
    for i, (r, c) in enumerate(zip(rows, cols)):
        candidates = np.flatnonzero(background[r])
        if len(candidates):
            out[i] = candidates[np.argmin(np.abs(candidates - c))]
    return out


def transform_objects(
    image: np.ndarray,
    bboxes: list,
    variant: str,
    instances: np.ndarray | None = None,
    instance_values: list[int] | None = None,
    depth: np.ndarray | None = None,
    weights: list[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Apply ``variant`` to the labelled objects of one image; return new ``(image, instances, depth)``.

    ``image`` uint8 [H, W, 3]; ``bboxes`` COCO ``[x, y, w, h]`` per object; with ``instances`` (uint16
    [H, W]) and the objects' ``instance_values`` the change follows the masks, else it fills the boxes.
    ``depth`` [H, W] (any dtype) is moved with the pixels. ``weights``: the objects' :func:`recolor`
    weights (default :func:`object_color_weights`). The inputs are not modified.
    """
    if variant not in VARIANT_FLAGS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if instances is not None and (instance_values is None or len(instance_values) != len(bboxes)):
        raise ValueError("transform_objects: with instances, give one instance value per box")
    color, flip = VARIANT_FLAGS[variant]
    out = image.copy()
    inst_out = None if instances is None else instances.copy()
    depth_out = None if depth is None else depth.copy()
    if not (color or flip) or not bboxes:
        return out, inst_out, depth_out
    height, width = image.shape[:2]
    if weights is None:
        weights = object_color_weights(image, instances, instance_values, len(bboxes))

    if instances is None:  # boxes only: recolour the union of the boxes once, then mirror box by box
        if color:
            inside = np.zeros((height, width), dtype=bool)
            for bbox in bboxes:
                r0, r1, c0, c1 = box_pixels(bbox, height, width)
                inside[r0:r1, c0:c1] = True
            out[inside] = recolor(image[inside])
        if flip:
            for i in _far_to_near(bboxes):
                r0, r1, c0, c1 = box_pixels(bboxes[i], height, width)
                out[r0:r1, c0:c1] = out[r0:r1, c0:c1][:, ::-1].copy()
                if depth_out is not None:
                    depth_out[r0:r1, c0:c1] = depth_out[r0:r1, c0:c1][:, ::-1].copy()
        return out, inst_out, depth_out

    if not flip:
        for value, weight in zip(instance_values, weights):
            inside = instances == value
            out[inside] = recolor(image[inside], weight)
        return out, inst_out, depth_out

    background = instances == 0
    for i in _far_to_near(bboxes):
        value = instance_values[i]
        r0, r1, c0, c1 = box_pixels(bboxes[i], height, width)
        window = instances[r0:r1, c0:c1]
        own = window == value
        mirrored = own[:, ::-1]
        # the mirrored object covers background and its own old pixels, never another object
        rows, cols = np.nonzero(mirrored & ((window == 0) | own))
        rows, dst, src = rows + r0, cols + c0, c1 - 1 - cols
        out[rows, dst] = recolor(image[rows, src], weights[i]) if color else image[rows, src]
        inst_out[rows, dst] = value
        if depth_out is not None:
            depth_out[rows, dst] = depth[rows, src]
        # pixels it leaves: the original background at the mirrored position (the box-mirror's content)
        rows, cols = np.nonzero(own & ~mirrored)
        rows, dst, src = rows + r0, cols + c0, c1 - 1 - cols
        other = ~background[rows, src]
        if other.any():
            src[other] = _nearest_background(background, rows[other], dst[other], src[other])
        out[rows, dst] = image[rows, src]
        inst_out[rows, dst] = 0
        if depth_out is not None:
            depth_out[rows, dst] = depth[rows, src]
    return out, inst_out, depth_out


def transform_attributes(attributes: dict | None, variant: str, weight: float = 1.0) -> dict | None:
    """The attributes of an object after ``variant``: ``color`` recoloured like its pixels (``weight``:
    the object's :func:`recolor` weight), ``orientation`` ``side`` <-> ``side_mirrored`` when mirrored."""
    if attributes is None:
        return None
    color, flip = VARIANT_FLAGS[variant]
    new = dict(attributes)
    if color and isinstance(new.get("color"), list) and len(new["color"]) == 3:
        new["color"] = [int(v) for v in recolor(np.asarray(new["color"], dtype=np.uint8), weight)]
    if flip and new.get("orientation") in MIRRORED_ORIENTATION:
        new["orientation"] = MIRRORED_ORIENTATION[new["orientation"]]
    return new


# --------------------------------------------------------------------------- depth and fog


def ground_plane_depth(
    height: int,
    width: int,
    horizon: float = 0.5,
    camera_height: float = 1.5,
    vfov_deg: float = 60.0,
    max_depth: float = 300.0,
) -> np.ndarray:
    """Depth in metres [H, W] of a flat ground seen by a level pinhole camera (no depth map known).

    The horizon is at row ``y_h = horizon * H``; the focal length in pixels is
    ``f = (H / 2) / tan(vfov / 2)``. A pixel row with centre ``y = row + 0.5`` below the horizon sees the
    ground at ``d = f * camera_height / (y - y_h)``; rows at or above the horizon (and depths beyond it)
    get ``max_depth``. Every column of a row has the same depth.
    """
    if not (0.0 <= horizon <= 1.0 and camera_height > 0 and 0.0 < vfov_deg < 180.0 and max_depth > 0):
        raise ValueError(
            f"ground_plane_depth: need 0 <= horizon <= 1, camera_height > 0, 0 < vfov_deg < 180, max_depth > 0; "
            f"got horizon={horizon}, camera_height={camera_height}, vfov_deg={vfov_deg}, max_depth={max_depth}"
        )
    focal = (height / 2.0) / math.tan(math.radians(vfov_deg) / 2.0)
    below = np.arange(height, dtype=np.float64) + 0.5 - horizon * height
    with np.errstate(divide="ignore"):
        rows = np.where(below > 0, focal * camera_height / np.where(below > 0, below, 1.0), max_depth)
    rows = np.minimum(rows, max_depth)
    return np.repeat(rows[:, None], width, axis=1)


# --------------------------------------------------------------------------- file helpers


def _read_rgb(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise VspaError(f"{path}: {what} cannot be read ({exc}). Restore the file or rerun the prepare stage.") from exc


def _read_uint16(path: Path, what: str, shape: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise VspaError(f"{path}: {what} not found. Restore the file or drop the field from the annotations.")
    try:
        with Image.open(path) as im:
            array = np.asarray(im)
    except OSError as exc:
        raise VspaError(f"{path}: {what} cannot be read ({exc}). Restore the file or rerun the prepare stage.") from exc
    if array.shape != shape or array.dtype.kind not in "ui":
        raise VspaError(
            f"{path}: {what} must be a single-channel 16-bit PNG of {shape[1]}x{shape[0]} pixels, got "
            f"{array.dtype} {array.shape}. Regenerate it."
        )
    return array.astype(np.uint16)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _png_name(file_name: str) -> str:
    return str(Path(file_name).with_suffix(".png"))


def _side_path(coco: CocoData, record: dict, key: str) -> Path | None:
    """The depth / instance file of an image record (relative to the annotation file's folder), if any."""
    name = record.get(key)
    return None if not name else coco.json_path.parent / name


def _load_split(src_dir: str | os.PathLike) -> CocoData:
    src_dir = Path(src_dir)
    return load_coco(src_dir / "annotations.json")


def _copy_side_file(coco: CocoData, record: dict, key: str, out_dir: Path) -> None:
    path = _side_path(coco, record, key)
    if path is not None:
        if not path.is_file():
            raise VspaError(
                f"{coco.json_path}: image id={record['id']}: {key} {path} not found. Restore it or rerun prepare."
            )
        (out_dir / record[key]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_dir / record[key])


def _object_arrays(coco: CocoData, record: dict, anns: list[dict]):
    """Image, instance map (or None), instance values and depth map (uint16 cm, or None) of one image."""
    shape = (record["height"], record["width"])
    image = _read_rgb(coco.image_path(record), f"image id={record['id']}")
    inst_path = _side_path(coco, record, "instance_file")
    instances = values = None
    if inst_path is not None:
        instances = _read_uint16(inst_path, f"instance map of image id={record['id']}", shape)
        missing = [a["id"] for a in anns if not isinstance(a.get("instance_value"), int)]
        if missing:
            raise VspaError(
                f"{coco.json_path}: annotation id(s) {missing[:5]} of image id={record['id']} have no integer "
                "'instance_value' but the image has an instance_file. Add the values or drop the instance_file."
            )
        values = [a["instance_value"] for a in anns]
    depth_path = _side_path(coco, record, "depth_file")
    depth = None if depth_path is None else _read_uint16(depth_path, f"depth map of image id={record['id']}", shape)
    return image, instances, values, depth


def _check_names_unique(coco: CocoData, names: list[str]) -> None:
    seen: dict[str, int] = {}
    for record, name in zip(coco.images, names):
        for key in ("file_name", "depth_file", "instance_file"):
            path = Path(record.get(key) or ".")
            if path.is_absolute() or ".." in path.parts:
                raise VspaError(
                    f"{coco.json_path}: image id={record['id']}: {key} {path} must be a path inside the split "
                    "folder (relative, no '..') to be copied into a derived set. Use image_root for the folder."
                )
        if name in seen:
            raise VspaError(
                f"{coco.json_path}: images id={seen[name]} and id={record['id']} would both be written to {name}. "
                "Give the images distinct file names (stems)."
            )
        seen[name] = record["id"]


def _write_variants(
    coco: CocoData, out_dir: str | os.PathLike, variant_of: dict[int, str], info: dict, desc: str
) -> dict[str, int]:
    """Write ``coco`` to ``out_dir`` with each image's objects transformed by ``variant_of[image id]``.

    Unchanged images are copied byte for byte under their file name; changed ones are written as PNG
    (file name with a ``.png`` suffix). Returns the number of images per variant.
    """
    names = [
        record["file_name"] if variant_of[record["id"]] == "none" else _png_name(record["file_name"])
        for record in coco.images
    ]
    _check_names_unique(coco, names)
    counts = {v: 0 for v in VARIANTS}
    images, annotations = [], []
    with atomic_dir(out_dir) as tmp:
        for record, name in tqdm(list(zip(coco.images, names)), desc=desc, unit="img", disable=None):
            variant = variant_of[record["id"]]
            counts[variant] += 1
            instances = weights = None
            anns = coco.annotations_by_image[record["id"]]
            if variant == "none":
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(coco.image_path(record), tmp / name)
                for key in ("depth_file", "instance_file"):
                    _copy_side_file(coco, record, key, tmp)
            else:
                image, instances, values, depth = _object_arrays(coco, record, anns)
                weights = object_color_weights(image, instances, values, len(anns))
                image, instances, depth = transform_objects(
                    image, [a["bbox"] for a in anns], variant, instances, values, depth, weights
                )
                _write_png(tmp / name, image)
                if instances is not None:
                    _write_png(tmp / record["instance_file"], instances)
                if depth is not None:
                    _write_png(tmp / record["depth_file"], depth)
            images.append({**record, "file_name": name, "augsim": {"variant": variant}})
            for k, ann in enumerate(anns):
                new = {**ann, "augsim": {"variant": variant}}
                if variant != "none" and instances is not None:  # a flip moves the mask: recount its pixels
                    new["area"] = float(np.count_nonzero(instances == ann["instance_value"]))
                if "attributes" in ann:
                    weight = weights[k] if weights else 1.0
                    new["attributes"] = transform_attributes(ann["attributes"], variant, weight)
                annotations.append(new)
        write_coco(tmp / "annotations.json", images, annotations, coco.category_records, info)
    return counts


# --------------------------------------------------------------------------- the derived sets


def augmented_count(num_images: int, fraction: float) -> int:
    """``round(fraction * N)``, halves rounded up (0.25 * 10 -> 3)."""
    return int(math.floor(fraction * num_images + 0.5))


def choose_variants(
    image_ids: list[int], fraction: float, seed: int, has_objects: list[bool] | None = None
) -> dict[int, str]:
    """image id -> variant: ``augmented_count`` images chosen by ``seed`` get a random changed variant.

    Images with objects (``has_objects``, default all) are chosen first: an image without labelled
    objects would not change. Each chosen image gets one of ``CHANGED_VARIANTS`` uniformly at random.
    """
    if not 0.0 <= fraction <= 1.0:
        raise VspaError(f"params.yaml: augsim.fraction must be in [0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    count = augmented_count(len(image_ids), fraction)
    flags = np.ones(len(image_ids), bool) if has_objects is None else np.asarray(has_objects, bool)
    with_objects, without = np.flatnonzero(flags), np.flatnonzero(~flags)
    chosen = rng.choice(with_objects, size=min(count, len(with_objects)), replace=False)
    if count > len(chosen):
        chosen = np.concatenate([chosen, rng.choice(without, size=count - len(chosen), replace=False)])
    picks = rng.integers(0, len(CHANGED_VARIANTS), size=len(chosen))
    variant_of = {image_id: "none" for image_id in image_ids}
    for index, pick in zip(chosen, picks):
        variant_of[image_ids[index]] = CHANGED_VARIANTS[pick]
    return variant_of


def make_augsim(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, fraction: float = 0.25, seed: int = 0
) -> dict[str, int]:
    """AugSim of the split in ``src_dir``: same images, ``round(fraction * N)`` replaced by a variant.

    Returns the number of images per variant (also recorded in ``info.augsim`` of the output).
    """
    coco = _load_split(src_dir)
    has_objects = [bool(coco.annotations_by_image[record["id"]]) for record in coco.images]
    variant_of = choose_variants([record["id"] for record in coco.images], fraction, seed, has_objects)
    counts = {v: 0 for v in VARIANTS}
    for variant in variant_of.values():
        counts[variant] += 1
    info = {
        **coco.info,
        "generator": GENERATOR,
        "augsim": {"source": str(src_dir), "fraction": fraction, "seed": seed, "variant_counts": counts},
    }
    return _write_variants(coco, out_dir, variant_of, info, desc=f"augsim {Path(out_dir).name}")


def make_variant_set(src_dir: str | os.PathLike, out_dir: str | os.PathLike, variant: str) -> dict[str, int]:
    """Every image of ``src_dir`` with its objects transformed by ``variant`` (a pairing-memory set)."""
    if variant not in CHANGED_VARIANTS:
        raise VspaError(f"make_variant_set: variant must be one of {CHANGED_VARIANTS}, got {variant!r}.")
    coco = _load_split(src_dir)
    info = {**coco.info, "generator": GENERATOR, "augsim": {"source": str(src_dir), "variant_set": variant}}
    variant_of = {record["id"]: variant for record in coco.images}
    return _write_variants(coco, out_dir, variant_of, info, desc=f"variant {variant}")


def make_foggy(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    beta: float,
    airlight: float,
    horizon: float = 0.5,
    camera_height: float = 1.5,
    vfov_deg: float = 60.0,
    max_depth: float = 300.0,
    source_label: str | None = None,
) -> dict[str, int]:
    """FoggyAugSim: the split of ``src_dir`` with fixed-intensity fog, annotations and ids unchanged.

    Depth: the image's ``depth_file`` (centimetres) where given, else :func:`ground_plane_depth` with
    ``horizon``, ``camera_height``, ``vfov_deg``, ``max_depth``. Returns how many images used each.
    ``source_label`` is recorded as the source in ``info.fog`` (default ``src_dir``).
    """
    from vspa.data.synth import apply_fog

    if beta < 0 or not 0.0 <= airlight <= 1.0:
        raise VspaError(
            f"params.yaml: augsim.fog_beta must be >= 0 and fog_airlight in [0, 1]; got {beta}, {airlight}."
        )
    coco = _load_split(src_dir)
    names = [_png_name(record["file_name"]) for record in coco.images]
    _check_names_unique(coco, names)
    counts = {"depth_map": 0, "ground_plane": 0}
    images, annotations = [], []
    info = {
        **coco.info,
        "domain": "target",
        "foggy": True,
        "generator": GENERATOR,
        "fog": {
            "source": source_label or str(src_dir),
            "beta": beta,
            "airlight": airlight,
            "horizon": horizon,
            "camera_height": camera_height,
            "vfov_deg": vfov_deg,
            "max_depth": max_depth,
        },
    }
    with atomic_dir(out_dir) as tmp:
        pairs = list(zip(coco.images, names))
        for record, name in tqdm(pairs, desc=f"fog {Path(out_dir).name}", unit="img", disable=None):
            image = _read_rgb(coco.image_path(record), f"image id={record['id']}")
            depth_path = _side_path(coco, record, "depth_file")
            if depth_path is not None:
                shape = (record["height"], record["width"])
                depth = _read_uint16(depth_path, f"depth map of image id={record['id']}", shape) * DEPTH_SCALE_M
                counts["depth_map"] += 1
            else:
                depth = ground_plane_depth(
                    record["height"], record["width"], horizon, camera_height, vfov_deg, max_depth
                )
                counts["ground_plane"] += 1
            foggy = apply_fog(image.astype(np.float32) / 255.0, depth, beta, airlight)
            _write_png(tmp / name, np.clip(foggy * 255.0 + 0.5, 0, 255).astype(np.uint8))
            for key in ("depth_file", "instance_file"):
                _copy_side_file(coco, record, key, tmp)
            images.append({**record, "file_name": name})
            annotations.extend(coco.annotations_by_image[record["id"]])
        info["fog"]["depth_source_counts"] = counts
        write_coco(tmp / "annotations.json", images, annotations, coco.category_records, info)
    return counts
