"""The translator's images and random streams: unpaired crops of each domain as a function of (seed, iteration).

Every random draw of a translator run comes from a stream seeded by ``derive_seed(seed, ..., stream)``
(:mod:`vspa.training.seeds`), the stream id last; the ids are listed here, in one place, so they stay apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vspa.training.seeds import derive_seed, global_batch
from vspa.translation.config import TranslateConfig
from vspa.utils import VspaError

# Streams of random numbers: derive_seed(seed, ..., stream), the stream id last (vspa.training.seeds).
_INIT, _TGT_ORDER, _SRC_ORDER, _TGT_CROP, _SRC_CROP, _VIEWS, _SAMPLER, _DIAG, _PRIME = range(9)


def stream(*numbers: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(*numbers)``."""
    return torch.Generator().manual_seed(derive_seed(*numbers))


def image_paths(split_dir: str | os.PathLike) -> list[Path]:
    """The image files of a split folder (``annotations.json``), in the order of its ``images`` list."""
    from vspa.data.coco import load_coco

    json_path = Path(split_dir) / "annotations.json"
    if not json_path.is_file():
        raise VspaError(f"{json_path}: annotations not found. Run the prepare stage or fix the split folder.")
    data = load_coco(json_path)
    if not data.images:
        raise VspaError(f"{json_path}: no images. The translator needs at least one image per domain.")
    return [data.image_path(img) for img in data.images]


def read_image(path: Path) -> torch.Tensor:
    """RGB image as ``[3, H, W]`` float in [-1, 1]."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise VspaError(f"{path}: unreadable image ({exc}). Regenerate the split or remove the image.") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class UnpairedImages:
    """Batches of random crops (and horizontal flips) of one domain's images, a function of
    ``(seed, iteration)``: images in the order of a permutation drawn afresh per epoch (``global_batch`` seeded
    by ``derive_seed(seed, order_stream)``), crop and flip of batch position ``p`` from
    ``derive_seed(seed, iteration, p, crop_stream)``."""

    def __init__(self, split_dir: str | os.PathLike, crop: tuple[int, int] | None, multiple: int):
        self.split_dir = Path(split_dir)
        self.paths = image_paths(split_dir)
        self.crop = crop
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.paths)

    def _crop(self, image: torch.Tensor, path: Path, generator: torch.Generator) -> torch.Tensor:
        _, h, w = image.shape
        if self.crop is None:
            if h % self.multiple or w % self.multiple:
                raise VspaError(
                    f"{path}: a {h}x{w} image is not a multiple of {self.multiple}; set "
                    f"translate.crop_height / crop_width to train on crops."
                )
            return image
        ch, cw = self.crop
        if h < ch or w < cw:
            raise VspaError(
                f"{path}: image {h}x{w} is smaller than the crop {ch}x{cw}; lower translate.crop_height / crop_width."
            )
        top = int(torch.randint(0, h - ch + 1, (), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=generator))
        return image[:, top : top + ch, left : left + cw]

    def indices(self, batch_size: int, seed: int, iteration: int, order_stream: int) -> list[int]:
        """The image indices of ``iteration``'s batch (every image once per epoch; a batch may straddle two)."""
        return global_batch(len(self.paths), batch_size, derive_seed(seed, order_stream), iteration)

    def sample(self, batch_size: int, seed: int, iteration: int, order_stream: int, crop_stream: int) -> torch.Tensor:
        crops = []
        for position, i in enumerate(self.indices(batch_size, seed, iteration, order_stream)):
            g = stream(seed, iteration, position, crop_stream)
            crop = self._crop(read_image(self.paths[i]), self.paths[i], g)
            crops.append(crop.flip(-1) if torch.rand((), generator=g).item() < 0.5 else crop)
        if len({tuple(c.shape) for c in crops}) > 1:
            raise VspaError(
                f"{self.split_dir}: images of different sizes in one batch; set "
                f"translate.crop_height / crop_width (or batch_size: 1)."
            )
        return torch.stack(crops)


def training_batch(
    targets: UnpairedImages, sources: UnpairedImages, cfg: TranslateConfig, iteration: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target and source batches of 0-based ``iteration``: a function of ``(cfg.seed, iteration)`` alone,
    the same for every variant."""
    return (
        targets.sample(cfg.batch_size, cfg.seed, iteration, _TGT_ORDER, _TGT_CROP),
        sources.sample(cfg.batch_size, cfg.seed, iteration, _SRC_ORDER, _SRC_CROP),
    )


def views_generator(cfg: TranslateConfig, iteration: int) -> torch.Generator:
    """The generator of ``iteration``'s local-global views."""
    return stream(cfg.seed, iteration, _VIEWS)
