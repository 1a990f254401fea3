"""An image grid for inspection.

Per image, without attention: one row, input | translated. With attention, two rows whose tiles line up:

- input | translated | content maps ``C_1 .. C_n``;
- background mask ``A_{n+1}`` | the winning mask per pixel (colour per mask, background black) | masks
  ``A_1 .. A_n`` (mask ``A_t`` under its content map ``C_t``).

Masks are drawn in gray from 0 (black) to 1 (white).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vspa.translation.generator import Translator
from vspa.utils import atomic_path

SEPARATOR = 2  # pixels of white between tiles


def palette(n: int) -> torch.Tensor:
    """``[n + 1, 3]`` uint8 colours: ``n`` evenly spaced hues for the foreground masks, black for the background."""
    import colorsys

    colours = [colorsys.hsv_to_rgb(t / max(n, 1), 0.9, 1.0) for t in range(n)] + [(0.0, 0.0, 0.0)]
    return (torch.tensor(colours) * 255).round().to(torch.uint8)


def winner_map(masks: torch.Tensor) -> np.ndarray:
    """``[n + 1, H, W]`` masks -> ``[H, W, 3]`` uint8: the colour of the largest mask at each pixel."""
    colours = palette(masks.shape[0] - 1)
    return colours[masks.detach().float().cpu().argmax(dim=0)].numpy()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] (or ``[H, W]`` mask in [0, 1], shown in gray) -> ``[H, W, 3]`` uint8."""
    if image.dim() == 2:
        image = image[None].expand(3, -1, -1) * 2 - 1
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(1, 2, 0).numpy()


def pad_to_multiple(x: torch.Tensor, multiple: int = 4) -> torch.Tensor:
    """Reflection-pad ``[B, C, H, W]`` at the bottom/right up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")


@torch.no_grad()
def translation_rows(generator: Translator, images: Sequence[torch.Tensor], device="cpu") -> list[list[np.ndarray]]:
    """The grid's rows for images ``[3, H, W]`` in [-1, 1] (see the module doc): one row per image without
    attention, two with."""
    was_training = generator.training
    generator.eval()
    rows = []
    try:
        for image in images:
            h, w = image.shape[-2:]
            out = generator.translate(pad_to_multiple(image[None].to(device)))
            rows.append(
                [to_uint8(image), to_uint8(out.image[0, :, :h, :w])]
                + ([] if out.content is None else [to_uint8(c[:, :h, :w]) for c in out.content[0]])
            )
            if out.masks is not None:
                masks = out.masks[0, :, :h, :w]
                rows.append([to_uint8(masks[-1]), winner_map(masks)] + [to_uint8(m) for m in masks[:-1]])
    finally:
        generator.train(was_training)
    return rows


def compose_grid(rows: list[list[np.ndarray]]) -> Image.Image:
    """Tiles side by side, rows one below the other, separated by white lines; rows may differ in width."""
    tile_h = max(t.shape[0] for row in rows for t in row)
    widths = [sum(t.shape[1] for t in row) + SEPARATOR * (len(row) - 1) for row in rows]
    canvas = np.full((len(rows) * (tile_h + SEPARATOR) - SEPARATOR, max(widths), 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        x = 0
        y = r * (tile_h + SEPARATOR)
        for tile in row:
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            x += tile.shape[1] + SEPARATOR
    return Image.fromarray(canvas)


def save_translation_grid(
    generator: Translator, images: Sequence[torch.Tensor], path: str | os.PathLike, device="cpu"
) -> None:
    """Write the grid of ``images`` (input | translated | masks) as a PNG, atomically."""
    grid = compose_grid(translation_rows(generator, images, device))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
