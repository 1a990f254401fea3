"""The detector's augmentations, deterministic given a ``torch.Generator`` (or an int seed).

- ``weak(image, target, rng)``: horizontal flip with probability 0.5; boxes (and ignore boxes) follow.
  Resizing is left to the detector's own transform.
- ``strong(image, rng)``: photometric only, so boxes stay valid: colour jitter (brightness, contrast,
  saturation 0.4, hue 0.1; p 0.8, in a random order), grayscale (p 0.2), gaussian blur (sigma in
  [0.1, 2], p 0.5), and random erasing as in Adaptive Teacher (three passes, p 0.7 / 0.5 / 0.3, area
  5-20% / 2-20% / 2-20%, aspect 0.3-3.3, filled with uniform noise).

Images are FloatTensor[3, H, W] in [0, 1] on any device; the random draws are made on the CPU generator,
so the result does not depend on the device. Inputs are never modified in place.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as F

FLIP_P = 0.5
JITTER_P, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.8, 0.4, 0.4, 0.4, 0.1
GRAYSCALE_P = 0.2
BLUR_P, BLUR_SIGMA = 0.5, (0.1, 2.0)
ERASING = ((0.7, (0.05, 0.2)), (0.5, (0.02, 0.2)), (0.3, (0.02, 0.2)))  # (p, area fraction range)
ERASING_RATIO = (0.3, 3.3)


def as_generator(rng: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator: ``rng`` itself, a fresh one seeded with an int, or one seeded from torch's global RNG."""
    if isinstance(rng, torch.Generator):
        return rng
    if rng is None:
        rng = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(int(rng))


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def flip_boxes(boxes: torch.Tensor, width: int | float) -> torch.Tensor:
    """Mirror xyxy boxes in an image ``width`` pixels wide: ``[x0, y0, x1, y1] -> [W - x1, y0, W - x0, y1]``."""
    flipped = boxes.clone()
    flipped[..., 0] = width - boxes[..., 2]
    flipped[..., 2] = width - boxes[..., 0]
    return flipped


def weak(image: torch.Tensor, target: dict, rng: torch.Generator | int | None = None) -> tuple[torch.Tensor, dict]:
    """Horizontal flip with probability 0.5. Returns a new target; ``target["flipped"]`` records the draw."""
    g = as_generator(rng)
    out = dict(target)
    flip = _chance(g, FLIP_P)
    if flip:
        width = image.shape[-1]
        image = image.flip(-1)
        for key in ("boxes", "ignore_boxes"):
            if key in out:
                out[key] = flip_boxes(out[key], width)
    out["flipped"] = flip
    return image, out


def _colour_jitter(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    order = torch.randperm(4, generator=g).tolist()
    factors = [
        _uniform(g, 1 - BRIGHTNESS, 1 + BRIGHTNESS),
        _uniform(g, 1 - CONTRAST, 1 + CONTRAST),
        _uniform(g, 1 - SATURATION, 1 + SATURATION),
        _uniform(g, -HUE, HUE),
    ]
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for k in order:
        image = ops[k](image, factors[k])
    return image


def _erase(image: torch.Tensor, g: torch.Generator, area_range: tuple[float, float]) -> torch.Tensor:
    """One random rectangle filled with uniform noise (torchvision's RandomErasing sampling, 10 tries)."""
    channels, height, width = image.shape[-3:]
    area = height * width
    log_lo, log_hi = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
    for _ in range(10):
        target_area = area * _uniform(g, *area_range)
        ratio = math.exp(_uniform(g, log_lo, log_hi))
        h = int(round(math.sqrt(target_area * ratio)))
        w = int(round(math.sqrt(target_area / ratio)))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            noise = torch.rand((channels, h, w), generator=g).to(image.device, image.dtype)
            return F.erase(image, top, left, h, w, noise)
    return image


def strong(image: torch.Tensor, rng: torch.Generator | int | None = None, erase: bool = True) -> torch.Tensor:
    """Photometric augmentation of a [3, H, W] image in [0, 1]; geometry (and so the boxes) unchanged.

    ``erase=False`` skips the random erasing (the other steps draw the same random numbers either way).
    """
    g = as_generator(rng)
    out = image
    if _chance(g, JITTER_P):
        out = _colour_jitter(out, g)
    if _chance(g, GRAYSCALE_P):
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if _chance(g, BLUR_P):
        sigma = _uniform(g, *BLUR_SIGMA)
        radius = min(int(math.ceil(3 * sigma)), (min(out.shape[-2:]) - 1) // 2)
        if radius > 0:
            out = F.gaussian_blur(out, [2 * radius + 1, 2 * radius + 1], [sigma, sigma])
    if erase:
        for p, area_range in ERASING:
            if _chance(g, p):
                out = _erase(out, g, area_range)
    return out.clamp(0.0, 1.0)
