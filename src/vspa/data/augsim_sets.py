"""The AugSim experiment's datasets (paper 3.2), all built at once: what the `augsim` stage writes.

From the benchmark's source splits (``src``):

- ``<augsim>/source_train``, ``<augsim>/source_test``: AugSim (``augsim.fraction`` of the images, chosen
  by ``augsim.seed``, with recoloured and/or mirrored objects);
- ``<augsim>/pairing/{color,flip,color_flip}``: every image of the original ``source_train`` in that
  variant (with the original split itself as ``none``, each object exists in all four appearances);
- ``<foggy>/target_train``, ``<foggy>/target_test``: FoggyAugSim, fixed-intensity fog on AugSim of the
  same images, so every target object has its exact counterpart in the source.

Params: ``augsim.{fraction, seed, fog_beta, fog_airlight, horizon, camera_height, vfov_deg, max_depth}`` (the
last four only for images without a depth map). Both output folders are built in temporary folders that
replace them only when everything was written. The single-set operations are in :mod:`vspa.data.augsim`.
"""

from __future__ import annotations

import time
from pathlib import Path

from vspa.config import stage_config
from vspa.data.augsim import CHANGED_VARIANTS, make_augsim, make_foggy, make_variant_set
from vspa.data.coco import atomic_dir
from vspa.utils import VspaError, atomic_path

KEYS = ("fraction", "seed", "fog_beta", "fog_airlight", "horizon", "camera_height", "vfov_deg", "max_depth")
SPLIT_PAIRS = (("source_train", "target_train"), ("source_test", "target_test"))


def read_config(params: str) -> dict:
    cfg = stage_config(params, "augsim")["augsim"]
    missing = [k for k in KEYS if cfg.get(k) is None]
    if missing:
        raise VspaError(
            f"{params}: section 'augsim:' lacks {', '.join(missing)}. Add them (see the README's params table)."
        )
    return cfg


def build(cfg: dict, src: Path, augsim_out: Path, foggy_out: Path) -> dict:
    """Write the three kinds of sets; return the summary."""
    fog = {k: cfg[k] for k in ("horizon", "camera_height", "vfov_deg", "max_depth")}
    summary: dict = {"params": {k: cfg[k] for k in KEYS}, "augsim": {}, "foggy": {}, "pairing": {}}
    start = time.perf_counter()
    with atomic_dir(augsim_out) as aug_tmp, atomic_dir(foggy_out) as fog_tmp:
        for source_split, target_split in SPLIT_PAIRS:
            summary["augsim"][source_split] = make_augsim(
                src / source_split, aug_tmp / source_split, float(cfg["fraction"]), int(cfg["seed"])
            )
            summary["foggy"][target_split] = make_foggy(
                aug_tmp / source_split,
                fog_tmp / target_split,
                float(cfg["fog_beta"]),
                float(cfg["fog_airlight"]),
                source_label=str(augsim_out / source_split),
                **fog,
            )
        for variant in CHANGED_VARIANTS:
            counts = make_variant_set(src / "source_train", aug_tmp / "pairing" / variant, variant)
            summary["pairing"][variant] = counts[variant]
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def examples_figure(original: Path, variants: Path, out: Path, count: int = 3) -> None:
    """A grid like the paper's Fig. 1(a): per row one image as original, colour, colour + flip, flip."""
    import numpy as np
    from PIL import Image

    from vspa.data.coco import load_coco

    columns = [load_coco(original / "annotations.json")]
    columns += [load_coco(variants / v / "annotations.json") for v in ("color", "color_flip", "flip")]
    rows = []
    for index in range(min(count, len(columns[0].images))):
        cells = []
        for coco in columns:
            with Image.open(coco.image_path(coco.images[index])) as im:
                cells.append(np.asarray(im.convert("RGB")))
        rows.append(np.concatenate(cells, axis=1))
    if rows:
        with atomic_path(out) as tmp:
            Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")
