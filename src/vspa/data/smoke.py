"""Tiny datasets in the folder layouts and image sizes of the real-data presets, for a smoke run at real size.

``write_fixture(scenario, root)`` writes under ``root`` (what ``data.root`` points at) a few images per split
of every dataset the preset ``scenario`` reads, in the layout its importer expects and at the dataset's real
image size:

- ``cityscapes_foggy``: ``cityscapes/`` with ``leftImg8bit/``, ``gtFine/`` (``*_gtFine_instanceIds.png``,
  uint16, class id x 1000 + instance) and ``leftImg8bit_foggy/`` at the three released fog levels, 2048x1024;
- ``sim10k_cityscapes``: ``Sim10k/`` (VOC layout, ``ImageSets/Main/trainval10k.txt``, 1914x1052, cars) and
  ``cityscapes/`` as above;
- ``voc_comic2k``: ``VOCdevkit/VOC2007`` (trainval, test) and ``VOCdevkit/VOC2012`` (trainval) at 500x375, and
  ``comic/`` (train, test) at 640x480, with the six shared classes.

Images are smooth colour fields with a filled rectangle per object (so a PNG of 2048x1024 is quick to write);
what matters is that every importer, the resizing to a 600-pixel shorter side and the real backbones run on
data of the real shape. ``write_random_weights(backbone, path)`` saves a randomly initialised torchvision
backbone's ``state_dict`` (the format ``model.pretrained_weights`` takes; no download).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vspa.data.importers.cityscapes import CITYSCAPES_LABEL_IDS as CITYSCAPES_IDS

CITYSCAPES_SIZE = (2048, 1024)
SIM10K_SIZE = (1914, 1052)
VOC_SIZE = (500, 375)
COMIC_SIZE = (640, 480)
FOG_BETAS = ("0.005", "0.01", "0.02")
COMIC_CLASSES = ("bicycle", "bird", "car", "cat", "dog", "person")
SCENARIOS = ("cityscapes_foggy", "sim10k_cityscapes", "voc_comic2k")


def _boxes(
    rng: np.random.Generator, size: tuple[int, int], classes, n: int, first: int = 0
) -> list[tuple[str, int, int, int, int]]:
    """``n`` boxes (class, x0, y0, x1, y1) of 5-30% of the image side, inside the image; the classes in turn
    from ``classes[first]`` on, so that a split's few images hold every class (an empty class stops subsample)."""
    w, h = size
    out = []
    for i in range(n):
        bw, bh = int(w * rng.uniform(0.05, 0.3)), int(h * rng.uniform(0.05, 0.3))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        out.append((str(classes[(first + i) % len(classes)]), x0, y0, x0 + bw, y0 + bh))
    return out


def _picture(rng: np.random.Generator, size: tuple[int, int], boxes) -> np.ndarray:
    w, h = size
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()
    for _, x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    return image.astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"compress_level": 1} if path.suffix == ".png" else {"quality": 90}))


def write_cityscapes(root: Path, rng: np.random.Generator, per_split: int = 2, classes=tuple(CITYSCAPES_IDS)) -> None:
    """``root`` = the ``cityscapes`` folder: train and val, clear images, instance-id maps and foggy images."""
    w, h = CITYSCAPES_SIZE
    for split in ("train", "val"):
        for k in range(per_split):
            stem = f"smoke_{k:06d}_000019"
            per_image = max(4, -(-len(classes) // per_split))
            boxes = _boxes(rng, CITYSCAPES_SIZE, classes, per_image, per_image * k)
            ids = np.full((h, w), 7, np.uint16)  # road (stuff)
            for i, (cls, x0, y0, x1, y1) in enumerate(boxes):
                ids[y0:y1, x0:x1] = CITYSCAPES_IDS[cls] * 1000 + i
            _save(root / "gtFine" / split / "smoke" / f"{stem}_gtFine_instanceIds.png", ids)
            image = _picture(rng, CITYSCAPES_SIZE, boxes)
            _save(root / "leftImg8bit" / split / "smoke" / f"{stem}_leftImg8bit.png", image)
            for beta in FOG_BETAS:
                t = np.float32(np.exp(-float(beta) * 60.0))  # a uniform 60 m of fog: enough for a smoke run
                foggy = (image * t + 200 * (1 - t)).astype(np.uint8)
                _save(root / "leftImg8bit_foggy" / split / "smoke" / f"{stem}_leftImg8bit_foggy_beta_{beta}.png", foggy)


def _voc_xml(size: tuple[int, int], boxes) -> str:
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, x0, y0, x1, y1 in boxes:
        parts.append(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
            f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def write_voc_layout(
    root: Path, rng: np.random.Generator, size: tuple[int, int], classes, lists: dict[str, int], prefix: str
) -> None:
    """A VOC-layout dataset: ``lists`` maps a split list name to its number of images."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in lists.items():
        ids = []
        for _ in range(n):
            image_id = f"{prefix}{k:06d}"
            k += 1
            per_image = max(3, -(-len(classes) // n))
            boxes = _boxes(rng, size, classes, per_image, per_image * k)
            _save(root / "JPEGImages" / f"{image_id}.jpg", _picture(rng, size, boxes))
            (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(size, boxes))
            ids.append(image_id)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def write_fixture(scenario: str, root: str | Path, per_split: int = 2, seed: int = 0) -> Path:
    """Write the tiny real-layout datasets of ``scenario`` under ``root`` (its ``data.root``); returns ``root``."""
    if scenario not in SCENARIOS:
        raise ValueError(f"no smoke fixture for scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    root = Path(root)
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario)])
    if scenario == "cityscapes_foggy":
        write_cityscapes(root / "cityscapes", rng, per_split)
    elif scenario == "sim10k_cityscapes":
        write_voc_layout(root / "Sim10k", rng, SIM10K_SIZE, ("car",), {"trainval10k": 2 * per_split}, "sim")
        write_cityscapes(root / "cityscapes", rng, per_split, classes=("car",))
    else:
        for year, lists in (
            ("VOC2007", {"trainval": per_split, "test": per_split}),
            ("VOC2012", {"trainval": per_split}),
        ):
            write_voc_layout(root / "VOCdevkit" / year, rng, VOC_SIZE, COMIC_CLASSES, lists, year[-4:])
        write_voc_layout(root / "comic", rng, COMIC_SIZE, COMIC_CLASSES, {"train": per_split, "test": per_split}, "c")
    return root


def write_random_weights(backbone: str, path: str | Path) -> Path:
    """A randomly initialised ImageNet-architecture backbone's ``state_dict`` in the format of
    ``model.pretrained_weights`` (built by torchvision's constructor: nothing is downloaded)."""
    import torch
    import torchvision

    # ResNets with zero-initialised residual branches (the last BatchNorm of each block has weight 0): the
    # detector freezes the BatchNorms of pretrained ResNets, and with plain random weights 33 frozen residual
    # blocks multiply the activations until the first losses are ~1e4 and the features overflow
    builders = {
        "vgg16": lambda: torchvision.models.vgg16(weights=None),
        "resnet50": lambda: torchvision.models.resnet50(weights=None, zero_init_residual=True),
        "resnet101": lambda: torchvision.models.resnet101(weights=None, zero_init_residual=True),
    }
    if backbone not in builders:
        raise ValueError(f"no ImageNet architecture {backbone!r}; one of {', '.join(builders)}")
    torch.manual_seed(0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(builders[backbone]().state_dict(), path)
    return path
