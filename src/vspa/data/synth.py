"""The embedded benchmark: procedural, deterministic driving-like street scenes (no downloads).

Scene model
-----------
A pinhole camera ``cam_height`` metres above a flat ground plane looks along the road; image row ``v``
below the horizon sees the ground at depth ``Z = focal * cam_height / (v - horizon)``, so an object whose
foot is at depth ``Z`` is ``focal * size / Z`` pixels big (size ~ 1 / depth). The focal length is
``0.9 * width`` pixels, which puts the bottom image row about 4.5 m ahead.

Each image has a sky, a road in perspective (dashed centre line, edge lines, kerbs, pavements, verge),
facades along both sides (buildings with windows, walls, gaps), a distant skyline, trees, lamp posts and
sign posts (occluders and distractors), and 2-8 objects of the scenario's classes:

- ``car`` (3.8-4.8 m long, 1.4-1.7 m high), ``person`` (1.55-1.9 m), ``truck`` (6.5-10 m, 3-3.8 m high);
- orientation ``front`` / ``back`` (narrow; headlights and grille vs red tail lights and plate),
  ``side`` (long, wheels, cabin; front to the right) or ``side_mirrored``;
- colour from a palette with jitter; depth log-uniform in ``DEPTH_RANGE_M`` (6-45 m; persons up to 28 m, ``CLASS_MAX_DEPTH_M``);
- objects are drawn near to far with a depth test, so a placed object's visible pixels are final:
  a placement that would be more than ``MAX_OCCLUSION`` hidden (by nearer objects, trees, posts or the
  image border), whose visible part is under ``MIN_HEIGHT_PX`` high or ``MIN_WIDTH_PX`` wide, or that
  would be taller than ``MAX_HEIGHT_FRACTION`` of the image, is redrawn further away (up to 3 times) or
  dropped. So every visible object pixel belongs to a label.

Scenarios
---------
- ``synth_fog``: source = clear scenes; target = other scenes with fog ``I = J t + A (1 - t)``,
  ``t = exp(-beta * depth)`` (``apply_fog``); classes car, person, truck. Both domains get the same
  mild sensor noise after the fog.
- ``synth_real``: source = flat game-like rendering (flat saturated colours, hard edges, no noise, camera
  1.6 m high, horizon at 36% of the height); target = camera-like statistics (surface texture, lighting
  and gamma, colour cast, vignetting, blur, noise, camera 1.25 m high, horizon at 48%); car only.

Every image depends only on ``(seed, split code, index)`` (``np.random.default_rng([seed, code, index])``),
so the output is the same whatever the number of worker processes, and adding the optional ``target_val``
split (code 4, its own seed stream) leaves the four others unchanged. ``object_id`` =
``split code * 10^7 + index * 100 + k``: unique within a split and across the splits.

Size (~1,000 lines, over the project's ~400): one generator; the drawing functions (sprites, scenery, road,
facades), the placement with its depth test and the split writer share the camera, the canvas and the seed of
each image, and the numbers they produce are pinned by tests (byte-identical splits). A split into a package
(scene / sprites / placement / writer) is the next step if it grows; such a split must leave the generated
splits byte-identical (``diff -r`` of a fresh prepare against the old one, as for every change here).
"""

from __future__ import annotations

import colorsys
import heapq
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vspa.data import OPTIONAL_SPLITS, SPLITS, split_info
from vspa.utils import VspaError

GENERATOR = "vspa-synth/1"
SCENARIO_CLASSES = {"synth_fog": ("car", "person", "truck"), "synth_real": ("car",)}
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS + OPTIONAL_SPLITS)}
ORIENTATIONS = ("front", "back", "side", "side_mirrored")

SKY_DEPTH_M = 655.35  # the largest depth a uint16 PNG in centimetres holds
SKYLINE_DEPTH_M = 400.0
FACADE_MAX_DEPTH_M = 300.0
DEPTH_RANGE_M = (6.0, 45.0)
# Persons stop nearer: at 45 m a 0.6 m wide person is 4 px wide, too thin for any anchor of a stride-4 map.
CLASS_MAX_DEPTH_M = {"person": 28.0}
OBJECTS_PER_IMAGE = (2, 8)
MAX_OCCLUSION = 0.6
MIN_HEIGHT_PX = 8
MIN_WIDTH_PX = 5
MAX_HEIGHT_FRACTION = 0.75  # a nearer placement is redrawn further away
PLACEMENT_RETRIES = 3
OBJECT_ID_SPLIT_STRIDE = 10_000_000
OBJECT_ID_IMAGE_STRIDE = 100
MAX_IMAGES_PER_SPLIT = OBJECT_ID_SPLIT_STRIDE // OBJECT_ID_IMAGE_STRIDE
CLASS_PROBS = {"car": 0.5, "person": 0.28, "truck": 0.22}
# Within-class appearance diversity (``prepare.diversity``): ``standard`` is the benchmark as it always was;
# ``high`` gives every object a colour of any hue, saturation and value, one of several surface patterns
# (plain, two-tone, stripes, checks, speckles) in a second colour, body proportions stretched by 0.8-1.25 in
# height and 0.85-1.2 in width, and makes truck a rare class. Where instance-level alignment should matter
# (paper 3.2): many looks per class, so the nearest source object says more than the class mean.
DIVERSITY = ("standard", "high")
CLASS_PROBS_HIGH = {"car": 0.62, "person": 0.32, "truck": 0.06}
PATTERNS = ("plain", "two_tone", "stripes", "checks", "speckles")
FOCAL_PER_WIDTH = 0.9


@dataclass(frozen=True)
class Style:
    """How a domain is rendered."""

    horizon: float  # horizon row as a fraction of the height
    cam_height: float  # metres
    shading: bool  # soft vertical shading of surfaces and objects (False: flat colours)
    noise: float  # sensor noise sigma added last
    saturation: float = 1.0  # >1: the game look
    camera: bool = False  # texture, lighting, colour cast, vignetting, blur


STYLES = {
    "clear": Style(horizon=0.40, cam_height=1.5, shading=True, noise=0.01),
    "game": Style(horizon=0.36, cam_height=1.6, shading=False, noise=0.0, saturation=1.3),
    "camera": Style(horizon=0.48, cam_height=1.25, shading=True, noise=0.0, camera=True),
}
DOMAIN_STYLE = {
    ("synth_fog", "source"): ("clear", False),
    ("synth_fog", "target"): ("clear", True),
    ("synth_real", "source"): ("game", False),
    ("synth_real", "target"): ("camera", False),
}


# --------------------------------------------------------------------------- fog


def apply_fog(image: np.ndarray, depth: np.ndarray, beta: float, airlight) -> np.ndarray:
    """Koschmieder's model: ``I = J t + A (1 - t)``, ``t = exp(-beta * depth)``.

    ``image``: float [H, W, 3] (or [H, W]) in [0, 1]; ``depth``: float [H, W] in metres; ``beta`` per metre;
    ``airlight`` a scalar or one value per channel. Pure: returns a new array.
    """
    image = np.asarray(image)
    depth = np.asarray(depth)
    if depth.shape != image.shape[: depth.ndim] or depth.ndim != 2:
        raise ValueError(f"depth {depth.shape} must be [H, W] matching image {image.shape}")
    dtype = np.result_type(image.dtype, np.float32)
    t = np.exp(-float(beta) * depth.astype(dtype))
    if image.ndim == 3:
        t = t[..., None]
    return image.astype(dtype) * t + np.asarray(airlight, dtype=dtype) * (1 - t)


# --------------------------------------------------------------------------- colours


CAR_COLOURS = np.array(
    [
        (0.92, 0.92, 0.90),
        (0.09, 0.09, 0.10),
        (0.70, 0.72, 0.75),
        (0.45, 0.46, 0.48),
        (0.75, 0.10, 0.10),
        (0.12, 0.25, 0.65),
        (0.08, 0.12, 0.35),
        (0.15, 0.45, 0.20),
        (0.92, 0.76, 0.10),
        (0.90, 0.45, 0.10),
        (0.45, 0.30, 0.18),
        (0.55, 0.10, 0.35),
    ],
    dtype=np.float32,
)
TRUCK_COLOURS = np.array(
    [
        (0.95, 0.95, 0.93),
        (0.80, 0.12, 0.10),
        (0.15, 0.30, 0.70),
        (0.95, 0.78, 0.10),
        (0.15, 0.50, 0.25),
        (0.92, 0.50, 0.10),
        (0.50, 0.52, 0.55),
    ],
    dtype=np.float32,
)
SKIN = np.array([(0.96, 0.80, 0.69), (0.88, 0.67, 0.52), (0.69, 0.48, 0.34), (0.45, 0.30, 0.21)], np.float32)
HAIR = np.array([(0.10, 0.07, 0.05), (0.35, 0.22, 0.12), (0.75, 0.60, 0.35), (0.55, 0.55, 0.55)], np.float32)
TROUSERS = np.array([(0.15, 0.22, 0.45), (0.08, 0.08, 0.09), (0.62, 0.55, 0.40), (0.35, 0.35, 0.37)], np.float32)
GLASS = np.array((0.13, 0.17, 0.24), np.float32)
TYRE = np.array((0.06, 0.06, 0.07), np.float32)
DARK = np.array((0.16, 0.16, 0.17), np.float32)
HEADLIGHT = np.array((1.0, 0.97, 0.80), np.float32)
TAILLIGHT = np.array((0.85, 0.06, 0.05), np.float32)


def _jitter(rng: np.random.Generator, colour, amount: float = 0.04) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0).astype(np.float32)


def _pick(rng: np.random.Generator, palette: np.ndarray, amount: float = 0.04) -> np.ndarray:
    return _jitter(rng, palette[rng.integers(len(palette))], amount)


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*s), rng.uniform(*v)), np.float32)


def _mix(a, b, w: float) -> np.ndarray:
    return (np.asarray(a, np.float32) * (1 - w) + np.asarray(b, np.float32) * w).astype(np.float32)


def _object_colour(rng: np.random.Generator, cls: str) -> np.ndarray:
    if cls == "car":
        return _hsv(rng, (0.5, 0.9), (0.3, 0.9)) if rng.random() < 0.2 else _pick(rng, CAR_COLOURS)
    if cls == "truck":
        return _pick(rng, TRUCK_COLOURS)
    return _hsv(rng, (0.3, 0.9), (0.25, 0.95))  # a person's top


# --------------------------------------------------------------------------- sprites


class Sprite:
    """A flat picture of one thing, ``width_m`` x ``height_m`` metres drawn at ``scale`` pixels per metre.

    ``x`` runs from the left edge, ``y`` is the height above the ground (metres); ``paint`` fills a
    region with a colour and adds it to the silhouette ``mask``.
    """

    def __init__(self, width_m: float, height_m: float, scale: float):
        self.w = max(1, int(round(width_m * scale)))
        self.h = max(1, int(round(height_m * scale)))
        self.x = ((np.arange(self.w, dtype=np.float32) + 0.5) * (width_m / self.w))[None, :]
        self.y = (height_m - (np.arange(self.h, dtype=np.float32) + 0.5) * (height_m / self.h))[:, None]
        self.mask = np.zeros((self.h, self.w), bool)
        self.rgb = np.zeros((self.h, self.w, 3), np.float32)

    def rect(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        return (self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float | None = None) -> np.ndarray:
        ry = rx if ry is None else ry
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def trapezoid(self, y0: float, y1: float, bottom: tuple[float, float], top: tuple[float, float]) -> np.ndarray:
        """Between heights y0..y1; left/right edges move linearly from ``bottom`` to ``top``."""
        f = (self.y - y0) / (y1 - y0)
        left = bottom[0] + f * (top[0] - bottom[0])
        right = bottom[1] + f * (top[1] - bottom[1])
        return (self.y >= y0) & (self.y < y1) & (self.x >= left) & (self.x < right)

    def limb(self, top: tuple[float, float], bottom: tuple[float, float], half_width: float) -> np.ndarray:
        """A slanted bar from point ``top`` down to point ``bottom`` (legs, arms)."""
        (xt, yt), (xb, yb) = top, bottom
        f = (self.y - yb) / (yt - yb)
        centre = xb + f * (xt - xb)
        return (self.y >= yb) & (self.y <= yt) & (np.abs(self.x - centre) <= half_width)

    def paint(self, region: np.ndarray, colour) -> None:
        region = np.broadcast_to(region, self.mask.shape)
        self.mask |= region
        self.rgb[region] = colour

    def shade(self, strength: float = 0.16) -> None:
        """Lighter at the top, darker at the bottom."""
        self.rgb *= (1 + strength / 2 - strength * np.linspace(0, 1, self.h, dtype=np.float32))[:, None, None]

    def mirror(self) -> None:
        self.mask = self.mask[:, ::-1].copy()
        self.rgb = self.rgb[:, ::-1].copy()


def _car(rng, colour, orientation: str, scale: float) -> Sprite:
    length, width, height = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.7)
    darker = colour * 0.7
    if orientation in ("side", "side_mirrored"):
        L, H = length, height
        s = Sprite(L, H, scale)
        r = 0.33 * H / 1.5
        s.paint(s.rect(0.03 * L, 0.99 * L, 0.22, 0.62 * H), colour)
        s.paint(s.trapezoid(0.62 * H, H, (0.22 * L, 0.80 * L), (0.30 * L, 0.62 * L)), colour)
        s.paint(s.trapezoid(0.66 * H, 0.95 * H, (0.25 * L, 0.76 * L), (0.31 * L, 0.625 * L)), GLASS)
        s.paint(s.rect(0.485 * L, 0.515 * L, 0.25, 0.97 * H), darker)  # door pillar and line
        s.paint(s.rect(0.03 * L, 0.99 * L, 0.22, 0.30), DARK)  # sill
        s.paint(s.rect(0.955 * L, 0.99 * L, 0.45 * H, 0.56 * H), HEADLIGHT)
        s.paint(s.rect(0.03 * L, 0.065 * L, 0.47 * H, 0.58 * H), TAILLIGHT)
        for cx in (0.2 * L, 0.8 * L):
            s.paint(s.ellipse(cx, r, r), TYRE)
            s.paint(s.ellipse(cx, r, 0.45 * r), (0.6, 0.6, 0.62))
    else:
        W, H = width, height
        s = Sprite(W, H, scale)
        s.paint(s.rect(0.05 * W, 0.22 * W, 0, 0.3), TYRE)
        s.paint(s.rect(0.78 * W, 0.95 * W, 0, 0.3), TYRE)
        s.paint(s.rect(0, W, 0.18, 0.62 * H), colour)
        s.paint(s.trapezoid(0.62 * H, H, (0.08 * W, 0.92 * W), (0.2 * W, 0.8 * W)), colour)
        s.paint(s.rect(0, W, 0.18, 0.26 * H), DARK)  # bumper
        if orientation == "front":
            s.paint(s.trapezoid(0.65 * H, 0.95 * H, (0.13 * W, 0.87 * W), (0.23 * W, 0.77 * W)), GLASS)
            s.paint(s.rect(0.06 * W, 0.28 * W, 0.42 * H, 0.53 * H), HEADLIGHT)
            s.paint(s.rect(0.72 * W, 0.94 * W, 0.42 * H, 0.53 * H), HEADLIGHT)
            s.paint(s.rect(0.33 * W, 0.67 * W, 0.30 * H, 0.50 * H), DARK)  # grille
        else:
            s.paint(s.trapezoid(0.69 * H, 0.93 * H, (0.16 * W, 0.84 * W), (0.25 * W, 0.75 * W)), GLASS)
            s.paint(s.rect(0.04 * W, 0.24 * W, 0.45 * H, 0.58 * H), TAILLIGHT)
            s.paint(s.rect(0.76 * W, 0.96 * W, 0.45 * H, 0.58 * H), TAILLIGHT)
            s.paint(s.rect(0.38 * W, 0.62 * W, 0.30 * H, 0.41 * H), (0.92, 0.92, 0.86))  # plate
    return s


def _truck(rng, colour, orientation: str, scale: float) -> Sprite:
    length, width, height = rng.uniform(6.5, 10.0), 2.5, rng.uniform(3.0, 3.8)
    stripe = _mix(colour, (0.1, 0.1, 0.1), 0.5)
    if orientation in ("side", "side_mirrored"):
        L, H = length, height
        s = Sprite(L, H, scale)
        s.paint(s.rect(0.02 * L, 0.98 * L, 0.45, 0.75), DARK)  # chassis
        s.paint(s.rect(0, 0.72 * L, 0.75, H), colour)  # cargo box
        s.paint(s.rect(0.02 * L, 0.70 * L, 0.50 * H, 0.56 * H), stripe)
        s.paint(s.trapezoid(0.6, 0.82 * H, (0.74 * L, L), (0.74 * L, 0.96 * L)), colour)  # cab
        s.paint(s.rect(0.82 * L, 0.95 * L, 0.55 * H, 0.76 * H), GLASS)
        s.paint(s.rect(0.985 * L, L, 0.20 * H, 0.27 * H), HEADLIGHT)
        for cx in (0.12 * L, 0.25 * L, 0.86 * L):
            s.paint(s.ellipse(cx, 0.5, 0.5), TYRE)
            s.paint(s.ellipse(cx, 0.5, 0.22), (0.6, 0.6, 0.62))
    else:
        W, H = width, height
        s = Sprite(W, H, scale)
        s.paint(s.rect(0.05 * W, 0.28 * W, 0, 0.2 * H), TYRE)
        s.paint(s.rect(0.72 * W, 0.95 * W, 0, 0.2 * H), TYRE)
        if orientation == "front":
            s.paint(s.rect(0.02 * W, 0.98 * W, 0.82 * H, H), stripe)  # cargo box above the cab
            s.paint(s.rect(0.04 * W, 0.96 * W, 0.15 * H, 0.82 * H), colour)
            s.paint(s.rect(0.10 * W, 0.90 * W, 0.52 * H, 0.76 * H), GLASS)
            grille = s.rect(0.28 * W, 0.72 * W, 0.22 * H, 0.42 * H)
            s.paint(grille, DARK)
            s.paint(grille & (np.mod(s.y, 0.12) < 0.05), (0.45, 0.45, 0.47))
            s.paint(s.rect(0.07 * W, 0.22 * W, 0.22 * H, 0.30 * H), HEADLIGHT)
            s.paint(s.rect(0.78 * W, 0.93 * W, 0.22 * H, 0.30 * H), HEADLIGHT)
            s.paint(s.rect(0, W, 0.15 * H, 0.19 * H), (0.5, 0.5, 0.52))  # bumper
        else:
            s.paint(s.rect(0, W, 0.2 * H, H), colour)
            s.paint(s.rect(0.49 * W, 0.51 * W, 0.22 * H, 0.97 * H), DARK)  # door split
            s.paint(s.rect(0.43 * W, 0.47 * W, 0.45 * H, 0.55 * H), DARK)
            s.paint(s.rect(0.53 * W, 0.57 * W, 0.45 * H, 0.55 * H), DARK)
            s.paint(s.rect(0.03 * W, 0.15 * W, 0.12 * H, 0.20 * H), TAILLIGHT)
            s.paint(s.rect(0.85 * W, 0.97 * W, 0.12 * H, 0.20 * H), TAILLIGHT)
            s.paint(s.rect(0.10 * W, 0.90 * W, 0.08 * H, 0.12 * H), DARK)  # under-run bar
    return s


def _person(rng, colour, orientation: str, scale: float) -> Sprite:
    H = rng.uniform(1.55, 1.9)
    skin, hair, trousers = _pick(rng, SKIN, 0.03), _pick(rng, HAIR, 0.03), _pick(rng, TROUSERS, 0.04)
    head_y, head_r = 0.93 * H, 0.065 * H
    if orientation in ("side", "side_mirrored"):
        W = 0.7
        s = Sprite(W, H, scale)
        hip, shoulder = (0.35, 0.5 * H), (0.35, 0.8 * H)
        s.paint(s.limb(hip, (0.14, 0.0), 0.055), trousers)  # back leg
        s.paint(s.limb(shoulder, (0.25, 0.5 * H), 0.045), _mix(colour, (0, 0, 0), 0.3))  # back arm
        s.paint(s.rect(0.25, 0.46, 0.49 * H, 0.82 * H), colour)  # torso
        s.paint(s.limb(hip, (0.56, 0.0), 0.055), trousers)  # front leg
        s.paint(s.limb(shoulder, (0.47, 0.48 * H), 0.045), colour)  # front arm
        s.paint(s.rect(0.0, W, 0.0, 0.03 * H) & s.mask, TYRE)  # shoes
        head = s.ellipse(0.36, head_y, head_r)
        s.paint(head, skin)
        s.paint(head & ((s.x < 0.36) | (s.y > head_y + 0.5 * head_r)), hair)  # face to the right
    else:
        W = 0.75
        s = Sprite(W, H, scale)
        s.paint(s.rect(0.22 * W, 0.47 * W, 0.03 * H, 0.5 * H), trousers)
        s.paint(s.rect(0.53 * W, 0.78 * W, 0.03 * H, 0.5 * H), trousers)
        s.paint(s.rect(0.22 * W, 0.47 * W, 0, 0.03 * H) | s.rect(0.53 * W, 0.78 * W, 0, 0.03 * H), TYRE)
        s.paint(s.rect(0.2 * W, 0.8 * W, 0.49 * H, 0.82 * H), colour)
        s.paint(s.rect(0.03 * W, 0.19 * W, 0.48 * H, 0.81 * H) | s.rect(0.81 * W, 0.97 * W, 0.48 * H, 0.81 * H), colour)
        s.paint(s.rect(0.03 * W, 0.19 * W, 0.44 * H, 0.48 * H) | s.rect(0.81 * W, 0.97 * W, 0.44 * H, 0.48 * H), skin)
        s.paint(s.rect(0.43 * W, 0.57 * W, 0.82 * H, 0.88 * H), skin)  # neck
        head = s.ellipse(0.5 * W, head_y, head_r)
        if orientation == "front":
            s.paint(head, skin)
            s.paint(head & (s.y > head_y + 0.45 * head_r), hair)
        else:
            s.paint(head, hair)
            s.paint(s.rect(0.3 * W, 0.7 * W, 0.55 * H, 0.78 * H), _mix(colour, (0, 0, 0), 0.45))  # backpack
    return s


SHAPES = {"car": _car, "truck": _truck, "person": _person}
FOOTPRINT_M = {  # (extent across the view, extent along the view) for the overlap check
    ("car", "front"): (1.9, 4.5),
    ("car", "side"): (4.5, 1.9),
    ("truck", "front"): (2.6, 8.5),
    ("truck", "side"): (8.5, 2.6),
    ("person", "front"): (0.7, 0.7),
    ("person", "side"): (0.7, 0.7),
}


def _tree(rng, scale: float) -> Sprite:
    R, trunk = rng.uniform(1.0, 2.4), rng.uniform(1.8, 3.2)
    s = Sprite(2 * R, trunk + 1.75 * R, scale)
    green = _jitter(rng, (0.18, rng.uniform(0.3, 0.5), 0.15), 0.05)
    s.paint(s.rect(R - 0.15, R + 0.15, 0, trunk + 0.5 * R), (0.33, 0.22, 0.13))
    s.paint(s.ellipse(0.55 * R, trunk + 0.55 * R, 0.55 * R), green * 0.85)
    s.paint(s.ellipse(1.45 * R, trunk + 0.55 * R, 0.55 * R), green * 0.9)
    s.paint(s.ellipse(R, trunk + 0.85 * R, 0.9 * R), green)
    return s


def _post(rng, scale: float, towards_left: bool) -> Sprite:
    grey = _jitter(rng, (0.5, 0.5, 0.52), 0.05)
    if rng.random() < 0.5:  # lamp post with an arm over the road
        height = rng.uniform(5.0, 8.0)
        s = Sprite(1.6, height, scale)
        s.paint(s.rect(0.05, 0.22, 0, height), grey)
        s.paint(s.rect(0.05, 1.45, height - 0.25, height - 0.12), grey)
        s.paint(s.rect(1.15, 1.6, height - 0.38, height - 0.12), (0.85, 0.85, 0.8))
        if towards_left:
            s.mirror()
    else:  # sign post
        s = Sprite(0.9, 3.0, scale)
        s.paint(s.rect(0.38, 0.52, 0, 2.6), grey)
        kind = rng.integers(3)
        if kind == 0:
            s.paint(s.ellipse(0.45, 2.55, 0.42), (0.85, 0.1, 0.1))
            s.paint(s.ellipse(0.45, 2.55, 0.3), (0.95, 0.95, 0.95))
        elif kind == 1:
            s.paint(s.rect(0.05, 0.85, 2.15, 2.95), (0.1, 0.3, 0.75))
        else:
            s.paint(np.abs(s.x - 0.45) + np.abs(s.y - 2.55) <= 0.4, (0.95, 0.8, 0.1))  # diamond
    return s


# --------------------------------------------------------------------------- scene


@dataclass
class Camera:
    height: int
    width: int
    horizon: float  # row of the horizon (pixels, may be fractional)
    focal: float  # pixels
    cam_height: float  # metres above the ground
    vx: float  # column of the vanishing point

    def foot_row(self, depth: float) -> float:
        return self.horizon + self.focal * self.cam_height / depth

    def column(self, lateral: float, depth: float) -> float:
        return self.vx + self.focal * lateral / depth


class Canvas:
    """Background colour and depth, plus a depth-tested layer of upright things (objects, trees, posts)."""

    def __init__(self, cam: Camera):
        self.cam = cam
        self.rgb = np.zeros((cam.height, cam.width, 3), np.float32)
        self.bg_depth = np.full((cam.height, cam.width), SKY_DEPTH_M, np.float32)
        self.fg_depth = np.full((cam.height, cam.width), np.inf, np.float32)
        self.instances = np.zeros((cam.height, cam.width), np.uint16)

    def place(self, sprite: Sprite, lateral: float, depth: float):
        """Where ``sprite`` standing at (lateral, depth) lands: (canvas slices, sprite slices), or None off-image."""
        cam = self.cam
        top = int(round(cam.foot_row(depth))) - sprite.h
        left = int(round(cam.column(lateral, depth) - sprite.w / 2))
        y0, y1 = max(top, 0), min(top + sprite.h, cam.height)
        x0, x1 = max(left, 0), min(left + sprite.w, cam.width)
        if y1 <= y0 or x1 <= x0:
            return None
        return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))

    def visible(self, sprite: Sprite, window, depth: float) -> np.ndarray:
        (cy, cx), (sy, sx) = window
        return sprite.mask[sy, sx] & (depth < self.fg_depth[cy, cx])

    def draw(self, sprite: Sprite, window, visible: np.ndarray, depth: float, instance: int = 0) -> None:
        (cy, cx), (sy, sx) = window
        self.rgb[cy, cx][visible] = sprite.rgb[sy, sx][visible]
        self.fg_depth[cy, cx][visible] = depth
        if instance:
            self.instances[cy, cx][visible] = instance

    def depth(self) -> np.ndarray:
        return np.where(np.isfinite(self.fg_depth), self.fg_depth, self.bg_depth)


def _sky_and_skyline(rng, canvas: Canvas, style: Style) -> None:
    cam = canvas.cam
    rows = np.arange(cam.height, dtype=np.float32)[:, None]
    top = _jitter(rng, (0.25, 0.45, 0.80), 0.08)
    low = _mix(top, (0.9, 0.92, 0.95), rng.uniform(0.4, 0.8))
    if rng.random() < 0.3:  # overcast
        top, low = _jitter(rng, (0.6, 0.62, 0.66), 0.05), _jitter(rng, (0.8, 0.8, 0.82), 0.04)
    t = np.clip(rows / max(cam.horizon, 1.0), 0, 1)[..., None] if style.shading else 0.5
    canvas.rgb[:] = top + (low - top) * t
    if rng.random() < 0.7:
        edges = np.cumsum(rng.integers(max(cam.width // 40, 2), max(cam.width // 10, 3), size=cam.width))
        block = np.searchsorted(edges, np.arange(cam.width), side="right")
        heights = rng.uniform(0.03, 0.3, size=block.max() + 1) * cam.horizon
        tops = cam.horizon - heights[block][None, :]
        mask = (rows >= tops) & (rows < cam.horizon)
        canvas.rgb[mask] = _mix(low, (0.35, 0.38, 0.45), rng.uniform(0.3, 0.6))
        canvas.bg_depth[mask] = SKYLINE_DEPTH_M


def _ground(canvas: Canvas, road: dict) -> None:
    """Road, kerbs, pavements and verge on the ground plane below the horizon (with its depth)."""
    cam = canvas.cam
    first = max(int(math.floor(cam.horizon + 0.25)), 0)  # first row whose centre is below the horizon
    if first >= cam.height:
        return
    rows = np.arange(first, cam.height, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(cam.width, dtype=np.float32)[None, :] + 0.5
    z = np.minimum(cam.focal * cam.cam_height / np.maximum(rows - cam.horizon, 1e-3), SKY_DEPTH_M)  # (h, 1)
    ax = np.abs((cols - cam.vx) * z / cam.focal - road["centre"])  # lateral distance from the road centre
    half, kerb = road["half"], road["half"] + road["pavement"]
    colour = np.empty(ax.shape + (3,), np.float32)
    colour[:] = road["verge"]
    colour[ax < kerb] = road["pavement_colour"]
    colour[(ax >= half) & (ax < half + 0.2)] = road["kerb_colour"]
    colour[ax < half] = road["asphalt"]
    line = 0.075
    dashes = np.mod(z / road["dash_period"], 1.0) < road["dash_duty"]
    colour[(ax < line) & dashes] = road["centre_line"]
    colour[np.abs(ax - (half - 0.35)) < line] = (0.9, 0.9, 0.88)
    canvas.rgb[first:] = colour
    canvas.bg_depth[first:] = z


def _facades(rng, canvas: Canvas, road: dict, style: Style) -> None:
    cam = canvas.cam
    rows = np.arange(cam.height, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(cam.width, dtype=np.float32)[None, :] + 0.5
    light = rng.uniform(0.75, 0.95)
    for side in (-1.0, 1.0):
        if rng.random() < 0.15:
            continue  # open field on this side
        offset = road["half"] + road["pavement"] + rng.uniform(0.3, 4.0)
        plane = side * road["centre"] + offset  # distance of the facade plane from the camera axis
        du = side * (cols - cam.vx)
        valid = du > 0.5
        z = np.where(valid, cam.focal * plane / np.maximum(du, 1e-3), 1e6)  # (1, W); 1e6: no facade
        lengths = rng.uniform(8.0, 30.0, size=24)
        bounds = rng.uniform(2.0, 12.0) + np.concatenate([[0.0], np.cumsum(lengths)])
        n = len(lengths)
        kind = rng.choice(3, size=n, p=[0.55, 0.25, 0.2])  # building, wall, gap
        top_m = np.where(kind == 0, rng.uniform(6.0, 22.0, n), rng.uniform(1.0, 2.8, n))
        colours = np.stack(
            [_jitter(rng, (0.6, 0.58, 0.55), 0.1) if k == 1 else _hsv(rng, (0.05, 0.45), (0.35, 0.85)) for k in kind]
        )
        window_period = rng.uniform(2.5, 5.0, n)
        floor = rng.uniform(2.8, 3.6, n)
        lit = rng.random(n) < 0.2
        seg = np.clip(np.searchsorted(bounds, z, side="right") - 1, 0, n - 1)
        in_range = valid & (z >= bounds[0]) & (z < min(bounds[-1], FACADE_MAX_DEPTH_M)) & (kind[seg] != 2)
        top_row = cam.horizon - cam.focal * (top_m[seg] - cam.cam_height) / z
        bottom_row = cam.horizon + cam.focal * cam.cam_height / z
        mask = in_range & (rows >= top_row) & (rows < bottom_row)
        if not mask.any():
            continue
        r, c = np.nonzero(mask)  # work on the facade's pixels only
        zp, sp = z[0, c], seg[0, c]
        height_m = cam.cam_height + (cam.horizon - rows[r, 0]) * zp / cam.focal  # height on the facade
        rgb = colours[sp] * (light if side < 0 else 1.0)
        storey = np.mod(height_m / floor[sp], 1.0)
        windows = (
            (kind[sp] == 0)
            & (np.mod(zp / window_period[sp], 1.0) < 0.45)
            & (storey > 0.35)
            & (storey < 0.8)
            & (height_m > 3.0)
            & (height_m < top_m[sp] - 0.8)
        )
        rgb[windows & ~lit[sp]] = GLASS * 1.3
        rgb[windows & lit[sp]] = (0.85, 0.8, 0.55)
        rgb[(kind[sp] == 1) & (height_m > top_m[sp] - 0.15)] *= 0.7  # wall coping
        if style.shading:
            rgb *= np.clip(0.8 + 0.02 * height_m, 0.8, 1.05)[:, None]
        canvas.rgb[r, c] = rgb
        canvas.bg_depth[r, c] = zp


def _road(rng) -> dict:
    asphalt = rng.uniform(0.22, 0.45)
    return {
        "centre": rng.uniform(-1.5, 1.5),
        "half": rng.uniform(3.5, 7.0),
        "pavement": rng.uniform(1.5, 4.0),
        "asphalt": _jitter(rng, (asphalt, asphalt, asphalt * 1.03), 0.02),
        "pavement_colour": _jitter(rng, (0.62, 0.6, 0.56), 0.06),
        "kerb_colour": _jitter(rng, (0.75, 0.75, 0.72), 0.04),
        "verge": _jitter(rng, (0.3, 0.45, 0.2), 0.08) if rng.random() < 0.6 else _jitter(rng, (0.5, 0.42, 0.3), 0.06),
        "centre_line": (0.92, 0.92, 0.9) if rng.random() < 0.7 else (0.92, 0.78, 0.15),
        "dash_period": rng.uniform(6.0, 12.0),
        "dash_duty": rng.uniform(0.3, 0.6),
    }


def _scenery(rng, canvas: Canvas, road: dict, style: Style) -> None:
    """Trees and posts on the pavements: occluders for the objects, drawn in the depth-tested layer."""
    cam = canvas.cam
    for _ in range(rng.integers(0, 9)):
        side = rng.choice((-1.0, 1.0))
        lateral = road["centre"] + side * (road["half"] + rng.uniform(0.4, road["pavement"]))
        depth = math.exp(rng.uniform(math.log(6.0), math.log(90.0)))
        scale = cam.focal / depth
        sprite = _tree(rng, scale) if rng.random() < 0.5 else _post(rng, scale, towards_left=side > 0)
        if style.shading:
            sprite.shade(0.2)
        window = canvas.place(sprite, lateral, depth)
        if window is not None:
            canvas.draw(sprite, window, canvas.visible(sprite, window, depth), depth)


def _overlaps(a: tuple, b: tuple) -> bool:
    (xa, za, wa, da), (xb, zb, wb, db) = a, b
    return abs(xa - xb) < (wa + wb) / 2 + 0.3 and abs(za - zb) < (da + db) / 2 + 0.3


def _sample_placement(rng, cls: str, road: dict, min_depth: float) -> tuple[float, float, str]:
    lo = max(min_depth, DEPTH_RANGE_M[0])
    hi = CLASS_MAX_DEPTH_M.get(cls, DEPTH_RANGE_M[1])
    depth = math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo * 1.01))))
    orientation = ORIENTATIONS[rng.integers(4)]
    half = road["half"]
    if cls == "person" and rng.random() < 0.75:  # on a pavement
        lateral = rng.choice((-1.0, 1.0)) * (half + rng.uniform(0.3, road["pavement"] - 0.2))
    elif orientation in ("side", "side_mirrored") or rng.random() < 0.3:  # crossing / anywhere on the road
        lateral = rng.uniform(-half, half)
    else:  # in a lane or parked at the kerb
        lateral = rng.choice((-1.0, 1.0)) * rng.choice((half / 2, half - 1.1)) + rng.uniform(-0.4, 0.4)
    return road["centre"] + lateral, depth, orientation


def _vary(rng, sprite: Sprite, colour: np.ndarray) -> str:
    """``diversity: high``: a surface pattern in a second colour on the body-coloured pixels, then the body
    proportions stretched (nearest-neighbour, in place). Returns the pattern's name."""
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    second = _hsv(rng, (0.0, 1.0), (0.1, 1.0))
    body = sprite.mask & np.all(sprite.rgb == colour, axis=-1)
    ys, xs = np.mgrid[0 : sprite.h, 0 : sprite.w]
    period = max(2, int(round(sprite.h * rng.uniform(0.08, 0.2))))
    if pattern == "two_tone":
        where = ys < sprite.h * rng.uniform(0.35, 0.65)
    elif pattern == "stripes":
        where = ((xs if rng.random() < 0.5 else ys) // period) % 2 == 1
    elif pattern == "checks":
        where = ((xs // period) + (ys // period)) % 2 == 1
    elif pattern == "speckles":
        where = rng.random((sprite.h, sprite.w)) < 0.3
    else:
        where = np.zeros_like(body)
    sprite.rgb[body & where] = second
    sy, sx = rng.uniform(0.8, 1.25), rng.uniform(0.85, 1.2)
    h, w = max(1, int(round(sprite.h * sy))), max(1, int(round(sprite.w * sx)))
    rows = np.minimum(((np.arange(h) + 0.5) * sprite.h / h).astype(np.int64), sprite.h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * sprite.w / w).astype(np.int64), sprite.w - 1)
    sprite.rgb = sprite.rgb[rows][:, cols].copy()
    sprite.mask = sprite.mask[rows][:, cols].copy()
    sprite.h, sprite.w = h, w
    return pattern


def _objects(
    rng, canvas: Canvas, road: dict, style: Style, classes: tuple[str, ...], diversity: str = "standard"
) -> list[dict]:
    """Sample, then place strictly near to far (a heap keyed by depth; a rejected object is resampled
    further away), so each kept object's visible pixels are final when it is drawn."""
    cam = canvas.cam
    probs = np.array([(CLASS_PROBS_HIGH if diversity == "high" else CLASS_PROBS)[c] for c in classes])
    n = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    heap = []
    for k in range(n):
        cls = classes[rng.choice(len(classes), p=probs / probs.sum())]
        lateral, depth, orientation = _sample_placement(rng, cls, road, DEPTH_RANGE_M[0])
        heapq.heappush(heap, (depth, k, cls, lateral, orientation, 0))
    bottom_depth = cam.focal * cam.cam_height / max(cam.height - cam.horizon, 1.0)
    placed, footprints = [], []
    while heap:
        depth, k, cls, lateral, orientation, attempt = heapq.heappop(heap)
        colour = _hsv(rng, (0.0, 1.0), (0.15, 0.95)) if diversity == "high" else _object_colour(rng, cls)
        found = _try_place(
            rng, canvas, cls, lateral, depth, orientation, colour, style, footprints, bottom_depth, diversity
        )
        if found is None:
            if attempt < PLACEMENT_RETRIES:
                lateral, new_depth, orientation = _sample_placement(rng, cls, road, depth)
                heapq.heappush(heap, (new_depth, k, cls, lateral, orientation, attempt + 1))
            continue
        sprite, window, visible, box = found
        instance = len(placed) + 1
        canvas.draw(sprite, window, visible, depth, instance)
        placed.append(
            {"instance": instance, "cls": cls, "colour": colour, "orientation": orientation, "depth": depth, **box}
        )
    return placed


def _try_place(
    rng, canvas, cls, lateral, depth, orientation, colour, style, footprints, bottom_depth, diversity: str = "standard"
):
    if depth < bottom_depth * 1.05:
        return None
    key = (cls, "side" if orientation.startswith("side") else "front")
    footprint = (lateral, depth, *FOOTPRINT_M[key])
    if any(_overlaps(footprint, other) for other in footprints):
        return None
    sprite = SHAPES[cls](rng, colour, orientation, canvas.cam.focal / depth)
    pattern = _vary(rng, sprite, colour) if diversity == "high" else None
    if orientation == "side_mirrored":
        sprite.mirror()
    if style.shading:
        sprite.shade()
    if not MIN_HEIGHT_PX <= sprite.h <= MAX_HEIGHT_FRACTION * canvas.cam.height:
        return None
    window = canvas.place(sprite, lateral, depth)
    if window is None:
        return None
    visible = canvas.visible(sprite, window, depth)
    count = int(visible.sum())
    occlusion = 1.0 - count / max(int(sprite.mask.sum()), 1)
    if count == 0 or occlusion > MAX_OCCLUSION:
        return None
    ys, xs = np.nonzero(visible)
    (cy, cx), _ = window
    x0, y0 = cx.start + int(xs.min()), cy.start + int(ys.min())
    x1, y1 = cx.start + int(xs.max()) + 1, cy.start + int(ys.max()) + 1
    if y1 - y0 < MIN_HEIGHT_PX or x1 - x0 < MIN_WIDTH_PX:
        return None
    footprints.append(footprint)
    box = {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": count, "occlusion": occlusion}
    return sprite, window, visible, box if pattern is None else {**box, "pattern": pattern}


# --------------------------------------------------------------------------- domain statistics


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of an [H, W, C] array (reflected borders)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        n = image.shape[axis]
        r = min(radius, n - 1)
        pad = [(0, 0)] * image.ndim
        pad[axis] = (r, r)
        padded = np.pad(image, pad, mode="reflect")
        out = np.zeros_like(image)
        for k, w in enumerate(taps[radius - r : radius + r + 1]):
            out += w * np.take(padded, np.arange(k, k + n), axis=axis)
        image = out
    return image


def _low_frequency(rng, height: int, width: int, cell: int) -> np.ndarray:
    small = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), np.float32)


def _camera_look(rng, image: np.ndarray) -> np.ndarray:
    """Real-camera statistics: texture, exposure and gamma, colour cast, vignetting, blur, noise."""
    h, w = image.shape[:2]
    texture = 0.07 * _low_frequency(rng, h, w, 6) + 0.04 * rng.standard_normal((h, w), dtype=np.float32)
    image = image * (1 + texture)[..., None]
    gain, gamma = rng.uniform(0.7, 1.15), rng.uniform(0.8, 1.3)
    cast = 1 + rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    image = gain * np.clip(image, 0, 1) ** gamma * cast
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    image = image * (1 - rng.uniform(0.1, 0.3) * r2 / 2)[..., None]
    image = _blur(image.astype(np.float32), rng.uniform(0.7, 1.3))
    noise = rng.uniform(0.015, 0.035)
    return image + noise * rng.standard_normal(image.shape, dtype=np.float32)


def _saturate(image: np.ndarray, factor: float) -> np.ndarray:
    grey = image.mean(axis=-1, keepdims=True)
    return grey + factor * (image - grey)


# --------------------------------------------------------------------------- one image


@dataclass
class RenderedImage:
    image: np.ndarray  # uint8 [H, W, 3]
    depth_cm: np.ndarray  # uint16 [H, W]
    instances: np.ndarray  # uint16 [H, W], value k = object with instance k
    objects: list[dict]  # instance, cls, colour (uint8 RGB), orientation, occlusion, bbox, area, depth
    domain: str
    style: str


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIO_CLASSES:
        raise VspaError(
            f"params.yaml: scenario '{scenario}' has no embedded benchmark; use one of "
            f"{', '.join(SCENARIO_CLASSES)} or set prepare.source: coco."
        )


def render_image(
    scenario: str,
    split: str,
    index: int,
    seed: int,
    height: int,
    width: int,
    fog_beta: float,
    fog_airlight: float,
    diversity: str = "standard",
) -> RenderedImage:
    """Render image ``index`` of ``split``: a pure function of its arguments (``diversity``: see ``DIVERSITY``)."""
    _check_scenario(scenario)
    if split not in SPLIT_CODES:
        raise VspaError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    domain = split.split("_")[0]
    style_name, foggy = DOMAIN_STYLE[(scenario, domain)]
    style = STYLES[style_name]
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    horizon = height * (style.horizon + rng.uniform(-0.03, 0.03))
    cam = Camera(
        height,
        width,
        horizon,
        FOCAL_PER_WIDTH * width,
        style.cam_height * rng.uniform(0.93, 1.07),
        width / 2 + width * rng.uniform(-0.12, 0.12),
    )
    canvas = Canvas(cam)
    road = _road(rng)
    _sky_and_skyline(rng, canvas, style)
    _ground(canvas, road)
    _facades(rng, canvas, road, style)
    _scenery(rng, canvas, road, style)
    objects = _objects(rng, canvas, road, style, SCENARIO_CLASSES[scenario], diversity)
    depth = canvas.depth()
    image = canvas.rgb
    if style.saturation != 1.0:
        image = _saturate(image, style.saturation)
    if foggy:
        image = apply_fog(np.clip(image, 0, 1), depth, fog_beta, fog_airlight)
    if style.camera:
        image = _camera_look(rng, image)
    if style.noise:
        image = image + style.noise * rng.standard_normal(image.shape, dtype=np.float32)
    for obj in objects:
        obj["colour"] = [int(round(float(c) * 255)) for c in obj["colour"]]
    return RenderedImage(
        image=np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8),
        depth_cm=np.clip(np.round(depth * 100), 0, 65535).astype(np.uint16),
        instances=canvas.instances,
        objects=objects,
        domain=domain,
        style=style_name,
    )


# --------------------------------------------------------------------------- benchmark


def _render_task(task: tuple) -> tuple[int, dict, list[dict]]:
    """Worker: render one image, write its three PNGs, return its image record and objects."""
    out_dir, scenario, split, index, seed, height, width, fog_beta, fog_airlight, diversity = task
    r = render_image(scenario, split, index, seed, height, width, fog_beta, fog_airlight, diversity)
    folder = Path(out_dir) / split
    name = f"{index:06d}.png"
    Image.fromarray(r.image).save(folder / "images" / name, compress_level=1)  # noisy: level 1 is 3x faster
    Image.fromarray(r.depth_cm).save(folder / "depth" / name)
    Image.fromarray(r.instances).save(folder / "instances" / name)
    record = {
        "id": index,
        "file_name": f"images/{name}",
        "width": width,
        "height": height,
        "depth_file": f"depth/{name}",
        "instance_file": f"instances/{name}",
    }
    classes = SCENARIO_CLASSES[scenario]
    base = SPLIT_CODES[split] * OBJECT_ID_SPLIT_STRIDE + index * OBJECT_ID_IMAGE_STRIDE
    objects = [
        {
            "image_id": index,
            "category_id": classes.index(o["cls"]) + 1,
            "bbox": [float(v) for v in o["bbox"]],
            "area": float(o["area"]),
            "iscrowd": 0,
            "object_id": base + o["instance"],
            "instance_value": o["instance"],
            "attributes": {
                "color": o["colour"],
                "orientation": o["orientation"],
                "occlusion": round(float(o["occlusion"]), 4),
                "depth_m": round(float(o["depth"]), 3),
                **({"pattern": o["pattern"]} if "pattern" in o else {}),
            },
        }
        for o in r.objects
    ]
    return index, record, objects


def _validate(
    scenario, sizes, seed, height, width, fog_beta, fog_airlight, workers, diversity="standard"
) -> dict[str, int]:
    _check_scenario(scenario)
    if diversity not in DIVERSITY:
        raise VspaError(f"params.yaml: prepare.diversity must be one of {', '.join(DIVERSITY)}, got {diversity!r}.")
    if isinstance(sizes, dict):  # optional splits: absent or 0 = not generated
        sizes = {k: v for k, v in sizes.items() if not (k in OPTIONAL_SPLITS and v in (None, 0))}
    if not isinstance(sizes, dict) or not set(SPLITS) <= set(sizes) <= set(SPLITS + OPTIONAL_SPLITS):
        raise VspaError(
            f"params.yaml: give the number of images of each split: prepare.{{{', '.join(SPLITS)}}} "
            f"(and optionally {', '.join(OPTIONAL_SPLITS)})."
        )
    for split, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_IMAGES_PER_SPLIT:
            raise VspaError(
                f"params.yaml: prepare.{split} must be an integer in [0, {MAX_IMAGES_PER_SPLIT}], got {n!r}."
            )
    if not isinstance(seed, int) or seed < 0:
        raise VspaError(f"params.yaml: prepare.seed must be a non-negative integer, got {seed!r}.")
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or not 64 <= value <= 4096:
            raise VspaError(f"params.yaml: prepare.{key} must be an integer in [64, 4096], got {value!r}.")
    if not isinstance(fog_beta, (int, float)) or not 0 <= fog_beta <= 1:
        raise VspaError(f"params.yaml: prepare.fog_beta must be in [0, 1] (per metre), got {fog_beta!r}.")
    if not isinstance(fog_airlight, (int, float)) or not 0 <= fog_airlight <= 1:
        raise VspaError(f"params.yaml: prepare.fog_airlight must be in [0, 1], got {fog_airlight!r}.")
    if not isinstance(workers, int) or workers < 1:
        raise VspaError(f"workers must be a positive integer, got {workers!r}.")
    return {split: sizes[split] for split in SPLITS + OPTIONAL_SPLITS if split in sizes}


def generate_benchmark(
    out_dir,
    scenario: str,
    sizes: dict[str, int],
    seed: int,
    height: int,
    width: int,
    fog_beta: float,
    fog_airlight: float,
    workers: int = 2,
    progress: bool = True,
    diversity: str = "standard",
) -> dict:
    """Render the four splits into ``out_dir/<split>/`` (images, depth, instances, annotations.json).

    Writes into ``out_dir`` directly (callers that must not leave a half-written dataset generate into a
    temporary folder, see ``vspa.data.coco.atomic_dir``). Returns a summary: per split the number of
    images and objects, objects per class, mean occlusion; the total seconds.
    """
    from tqdm import tqdm

    from vspa.data.coco import write_coco

    sizes = _validate(scenario, sizes, seed, height, width, fog_beta, fog_airlight, workers, diversity)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    classes = SCENARIO_CLASSES[scenario]
    categories = [{"id": k, "name": name} for k, name in enumerate(classes, start=1)]
    tasks = []
    for split, n in sizes.items():
        for sub in ("images", "depth", "instances"):
            (out_dir / split / sub).mkdir(parents=True, exist_ok=True)
        tasks += [
            (str(out_dir), scenario, split, i, seed, height, width, float(fog_beta), float(fog_airlight), diversity)
            for i in range(n)
        ]
    bar = tqdm(total=len(tasks), desc=f"generate {scenario}", unit="img", disable=None if progress else True)
    results = {}
    if workers == 1 or len(tasks) < 16:
        for task in tasks:
            results[(task[2], task[3])] = _render_task(task)
            bar.update()
    else:
        # fork where the platform has it: no re-import of the caller's main module, and workers start at once
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
            for task, result in zip(tasks, pool.map(_render_task, tasks, chunksize=8)):
                results[(task[2], task[3])] = result
                bar.update()
    bar.close()

    summary = {
        "scenario": scenario,
        "seed": seed,
        "height": height,
        "width": width,
        "fog_beta": fog_beta,
        "fog_airlight": fog_airlight,
        "generator": GENERATOR,
        "splits": {},
    }
    if diversity != "standard":  # the standard benchmark's files stay byte-identical to before the knob
        summary["diversity"] = diversity
    for split, n in sizes.items():
        images, annotations = [], []
        for i in range(n):
            _, record, objects = results[(split, i)]
            images.append(record)
            for obj in objects:
                annotations.append({"id": len(annotations), **obj})
        domain = split.split("_")[0]
        info = split_info(
            scenario,
            split,
            seed=seed,
            generator=GENERATOR,
            style=DOMAIN_STYLE[(scenario, domain)][0],
            foggy=DOMAIN_STYLE[(scenario, domain)][1],
            fog_beta=fog_beta,
            fog_airlight=fog_airlight,
            **({"diversity": diversity} if diversity != "standard" else {}),
        )
        write_coco(out_dir / split / "annotations.json", images, annotations, categories, info)
        per_class = {name: sum(a["category_id"] == k for a in annotations) for k, name in enumerate(classes, 1)}
        summary["splits"][split] = {
            "images": n,
            "objects": len(annotations),
            "per_class": per_class,
            "objects_per_image": round(len(annotations) / n, 3) if n else 0.0,
            "mean_occlusion": round(float(np.mean([a["attributes"]["occlusion"] for a in annotations])), 4)
            if annotations
            else 0.0,
        }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
