"""Run a detector over a dataset split and evaluate it: the library side of ``stages/evaluate.py``."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vspa.evaluation.voc import evaluate_detections
from vspa.training.prefetch import Prefetcher, default_workers, pinned, to_device
from vspa.utils import VspaError, atomic_path


def _ground_truth(target: dict) -> dict[str, np.ndarray]:
    """GT of one image as numpy: ``boxes``, ``labels`` and, when the dataset gives them (crowd regions),
    ``ignore_boxes`` / ``ignore_labels``."""
    keys = ("boxes", "labels", "ignore_boxes", "ignore_labels")
    return {k: target[k].detach().cpu().numpy() for k in keys if k in target}


def _detect_split(detector, dataset, device, batch_size: int, progress: bool):
    """Detections and ground truths of every image of ``dataset``, in dataset order."""
    if batch_size < 1:
        raise VspaError(f"params.yaml: evaluate.batch_size must be >= 1, got {batch_size}.")
    device = torch.device(device)
    was_training = detector.training
    detector.to(device).eval()
    detections, ground_truths = [], []
    try:
        starts = range(0, len(dataset), batch_size)

        workers = default_workers(device)
        pin = workers > 0 and device.type == "cuda"

        def make(start: int) -> tuple[list, list]:  # on CUDA read and decoded ahead in a data thread
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            return pinned([image for image, _ in items], pin), [_ground_truth(target) for _, target in items]

        with torch.no_grad(), Prefetcher(make, starts, workers) as batches:
            for images, truths in tqdm(
                batches, total=len(starts), desc="evaluate", unit="batch", disable=None if progress else True
            ):
                for out in detector.detect(to_device(images, device)):
                    detections.append({k: out[k].detach().cpu().numpy() for k in ("boxes", "labels", "scores")})
                ground_truths += truths
    finally:
        detector.train(was_training)
    return detections, ground_truths


def run_detector(detector, dataset, device, batch_size: int, progress: bool = True) -> list[dict]:
    """Detections (numpy ``boxes`` xyxy in original image pixels, ``labels`` 1..C, ``scores``) for every
    image of ``dataset`` in order, computed in eval mode without gradients; the detector's train/eval mode
    is restored afterwards."""
    return _detect_split(detector, dataset, device, batch_size, progress)[0]


def _load(checkpoint_path: str | os.PathLike, data_dir: str | os.PathLike, device):
    """The checkpoint's detector on ``device``, the split's dataset and its class names (checked equal)."""
    from vspa.data.coco import DetectionDataset
    from vspa.detection.checkpoint import load

    checkpoint_path, data_dir = Path(checkpoint_path), Path(data_dir)
    json_path = data_dir / "annotations.json"
    if not json_path.is_file():
        raise VspaError(f"{json_path}: annotations not found. Run the prepare stage or fix --data.")
    detector, meta = load(checkpoint_path, device)
    dataset = DetectionDataset(json_path)
    model_classes, data_classes = list(meta["class_names"]), list(dataset.class_names)
    if model_classes != data_classes:
        raise VspaError(
            f"{checkpoint_path} was trained on classes {model_classes} but {json_path} has categories "
            f"{data_classes}; evaluate on a split with the same categories in the same order."
        )
    return detector, dataset, data_classes


def evaluate_model(
    checkpoint_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    device,
    batch_size: int,
    iou: float = 0.5,
    progress: bool = True,
    subsets: dict[str, dict] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Evaluate a checkpoint on the split in ``data_dir`` (``annotations.json`` + images).

    Returns the metrics dict (``EvalResult.to_json()`` layout, AP in percent: ``mAP`` / ``AP`` are VOC
    all-point AP, the paper's metric; ``coco_mAP50`` / ``coco_AP50`` the COCO-style 101-point AP at the same
    IoU through pycocotools with detectron2's 100 detections per image, the metric of detectron2-based work)
    and the PR curves (``{class: {"recall", "precision", "scores"}}``).

    ``subsets`` (``evaluate.subsets``): ``{name: {image field: value, ...}}``; each named subset of the split's
    images (those whose COCO image entry has every listed field at the listed value, e.g. ``fog_beta: 0.02`` of
    Foggy Cityscapes) is scored on its own from the same detections, under ``metrics["subsets"][name]``.
    """
    detector, dataset, class_names = _load(checkpoint_path, data_dir, device)
    detections, ground_truths = _detect_split(detector, dataset, device, batch_size, progress)
    ordered, curves = score(detections, ground_truths, class_names, iou)
    if subsets:
        where = f"{Path(data_dir) / 'annotations.json'}"
        ordered["subsets"] = {}
        for name, spec in subsets.items():
            idx = subset_indices(dataset.coco.images, spec, name, where)
            ordered["subsets"][name] = score(
                [detections[i] for i in idx], [ground_truths[i] for i in idx], class_names, iou
            )[0]
    return ordered, curves


RESULT_KEYS = ("mAP", "AP", "coco_mAP50", "coco_AP50")


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, info): the AP figures (the DVC metrics file, so `dvc metrics show` / `dvc exp show` list AP and
    nothing else) and the rest (image / GT / detection counts, IoU, metric name; the subsets' counts)."""
    results = {k: metrics[k] for k in RESULT_KEYS if k in metrics}
    info = {k: v for k, v in metrics.items() if k not in RESULT_KEYS and k != "subsets"}
    if metrics.get("subsets"):
        results["subsets"] = {n: {k: m[k] for k in RESULT_KEYS if k in m} for n, m in metrics["subsets"].items()}
        info["subsets"] = {
            n: {k: v for k, v in m.items() if k not in RESULT_KEYS} for n, m in metrics["subsets"].items()
        }
    return results, info


def score(detections: list[dict], ground_truths: list[dict], class_names, iou: float):
    """VOC and COCO-style AP50 of one set of images -> (metrics dict, PR curves)."""
    from vspa.evaluation.coco_check import DETECTRON2_MAX_DETS, coco_ap50

    result = evaluate_detections(detections, ground_truths, class_names, iou_threshold=iou)
    coco = coco_ap50(detections, ground_truths, class_names, max_dets=DETECTRON2_MAX_DETS, iou=iou)
    metrics = result.to_json()
    keys = list(metrics)  # the COCO-style figures right after the VOC ones, so both lead the metrics file
    at = keys.index("AP") + 1
    ordered = dict(list(metrics.items())[:at])
    ordered.update(coco_mAP50=coco["mAP"], coco_AP50=coco["AP"])
    ordered.update(dict(list(metrics.items())[at:]))
    return ordered, result.pr_curves()


def subset_indices(images: list[dict], spec: dict, name: str, where: str) -> list[int]:
    """Indices of the images whose entry has every ``field: value`` of ``spec`` (numbers compared as floats).

    Raises VspaError naming the subset and the file when the spec is malformed or selects no image."""
    if not isinstance(spec, dict) or not spec:
        raise VspaError(
            f"evaluate.subsets.{name}: expected a mapping of image field -> value (e.g. "
            f"{{fog_beta: 0.02}}), got {spec!r}."
        )

    def same(a, b) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return float(a) == float(b)
        return a == b

    idx = [i for i, img in enumerate(images) if all(k in img and same(img[k], v) for k, v in spec.items())]
    if not idx:
        seen = {k: sorted({repr(img[k]) for img in images if k in img}) for k in spec}
        raise VspaError(
            f"evaluate.subsets.{name} = {spec}: no image of {where} matches (values there: {seen}). "
            f"Fix the subset or prepare the split with those images (e.g. foggy_cityscapes beta: all)."
        )
    return idx


def downsample_curve(recall: np.ndarray, precision: np.ndarray, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a PR curve, evenly spaced along it, first and last kept."""
    n = len(recall)
    if n <= max_points:
        return np.asarray(recall), np.asarray(precision)
    idx = np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))
    return np.asarray(recall)[idx], np.asarray(precision)[idx]


def write_pr_csv(path: str | os.PathLike, curves: dict[str, dict[str, np.ndarray]], max_points: int = 200) -> None:
    """PR curves as a CSV (``class,recall,precision``; each curve downsampled), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "recall", "precision"])
        for name, curve in curves.items():
            recall, precision = downsample_curve(curve["recall"], curve["precision"], max_points)
            writer.writerows([name, f"{r:.6g}", f"{p:.6g}"] for r, p in zip(recall, precision))
