"""The `prepare` stage's logic: the benchmark's splits from the configured source, written atomically.

- ``prepare.source: synth``: render the embedded benchmark of the scenario (``vspa.data.synth``).
- ``prepare.source: import``: build a real-data scenario's splits from ``prepare.splits`` with
  ``vspa.data.importers.prepare_scenario`` (datasets under ``data.root``).
- ``prepare.source: coco``: validate the four ``prepare.coco.<split>.{json,images}`` with ``load_coco`` and
  write a normalised ``annotations.json`` per split whose ``image_root`` points at the images (no copies).

The splits are built in a temporary folder beside ``out`` that replaces it only at the end, so a failed run
leaves the previous dataset as it was. A summary (counts per split and class, seconds) goes to ``summary_path``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vspa.config import stage_config
from vspa.data import OPTIONAL_SPLITS, SPLITS, split_info
from vspa.data.coco import atomic_dir, dataset_sha256, load_coco, write_coco
from vspa.data.synth import OBJECT_ID_SPLIT_STRIDE, generate_benchmark
from vspa.utils import VspaError, write_json_atomic

IMPORTER = "vspa-import/1"


def import_coco(cfg: dict, scenario: str, out: Path, params_path: str, final_out: Path) -> dict:
    """Validate all four splits first, then write their normalised annotation files under ``out``.

    ``image_root`` is written relative to ``final_out/<split>`` (where the file will live) when possible.
    """
    specs = cfg.get("coco") or {}
    loaded = {}
    for split in SPLITS:
        spec = specs.get(split) or {}
        json_path, images = spec.get("json"), spec.get("images")
        if not json_path or not images:
            raise VspaError(
                f"{params_path}: prepare.coco.{split} needs 'json' (the COCO annotation file) and 'images' "
                f"(the folder its file_name entries are relative to); got {spec!r}."
            )
        loaded[split] = load_coco(json_path, image_root=images, check_images=True)
    reference = loaded[SPLITS[0]].category_records
    for split, data in loaded.items():
        if data.category_records != reference:
            raise VspaError(
                f"{data.json_path}: categories {data.category_records} differ from those of "
                f"{loaded[SPLITS[0]].json_path} ({reference}); all four splits must share one label space."
            )

    summary = {"scenario": scenario, "source": "coco", "splits": {}}
    for code, split in enumerate(SPLITS):
        data = loaded[split]
        final_dir = (final_out / split).resolve()
        root = Path(data.root).resolve()
        try:
            image_root = os.path.relpath(root, final_dir)
        except ValueError:  # another drive (Windows)
            image_root = str(root)
        images = [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in data.images]
        annotations, per_class = [], {name: 0 for name in data.categories}
        for img in data.images:
            for ann in data.annotations_by_image[img["id"]]:
                annotations.append(
                    {
                        "id": ann["id"],
                        "image_id": ann["image_id"],
                        "category_id": ann["category_id"],
                        "bbox": [float(v) for v in ann["bbox"]],
                        "area": float(ann.get("area", ann["bbox"][2] * ann["bbox"][3])),
                        "iscrowd": int(ann.get("iscrowd", 0)),
                        "object_id": code * OBJECT_ID_SPLIT_STRIDE + len(annotations),
                        **({"attributes": ann["attributes"]} if isinstance(ann.get("attributes"), dict) else {}),
                    }
                )
                if not ann.get("iscrowd", 0):
                    per_class[data.categories[data.cat_id_to_label[ann["category_id"]] - 1]] += 1
        info = split_info(
            scenario,
            split,
            generator=IMPORTER,
            source_json=str(data.json_path),
            source_sha256=dataset_sha256(data.json_path),
        )
        write_coco(out / split / "annotations.json", images, annotations, data.category_records, info, image_root)
        summary["splits"][split] = {
            "images": len(images),
            "objects": sum(per_class.values()),
            "per_class": per_class,
            "crowd_regions": sum(a["iscrowd"] for a in annotations),
        }
    return summary


def prepare(params_path: str, out: Path, summary_path: Path, workers: int, progress: bool = True) -> dict:
    cfg_all = stage_config(params_path, "data", "prepare")
    scenario, cfg = cfg_all["scenario"], cfg_all["prepare"]
    source = cfg.get("source")
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        if source == "synth":
            summary = generate_benchmark(
                tmp,
                scenario,
                {split: cfg.get(split) for split in SPLITS + tuple(s for s in OPTIONAL_SPLITS if cfg.get(s))},
                seed=cfg.get("seed"),
                height=cfg.get("height"),
                width=cfg.get("width"),
                fog_beta=cfg.get("fog_beta"),
                fog_airlight=cfg.get("fog_airlight"),
                workers=workers,
                progress=progress,
                diversity=cfg.get("diversity") or "standard",
            )
            summary["source"] = "synth"
        elif source == "coco":
            summary = import_coco(cfg, scenario, tmp, params_path, out)
        elif source == "import":
            from vspa.data.importers import prepare_scenario

            splits = prepare_scenario(cfg, cfg_all["data"].get("root") or ".", tmp, scenario)
            summary = {"scenario": scenario, "source": "import", "splits": splits}
        else:
            raise VspaError(f"{params_path}: prepare.source is {source!r}; set it to 'synth', 'import' or 'coco'.")
    summary.setdefault("seconds", round(time.perf_counter() - start, 2))
    write_json_atomic(summary_path, summary)
    return summary
