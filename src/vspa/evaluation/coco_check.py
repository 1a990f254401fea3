"""AP at IoU 0.5 through pycocotools, to cross-check ``vspa.evaluation.voc``.

``coco_ap50`` runs ``COCOeval`` with ``iouThrs=[0.5]``, one area range (all) and a ``maxDets`` large
enough never to cut detections, on the same inputs as ``evaluate_detections``. Ignore regions become
``iscrowd=1`` annotations, which COCO treats like the VOC module does (a detection inside a crowd region
by >= 0.5 of its own area is dropped).

Expected differences from ``evaluate_detections`` (so the two agree closely but not exactly):

1. Interpolation. COCO averages the precision envelope at 101 recall points 0, 0.01, ..., 1; VOC
   integrates the same envelope exactly (all-point). For a non-increasing envelope p with values in
   [0, 1] the 101-point mean lies within 1/100 of the integral, so per class (and so for mAP) the two
   differ by at most 1 AP point when the matching is the same.
2. Matching. When a detection's best GT is already taken, VOC counts it as a false positive; COCO moves
   on to the next free GT (or crowd region) with IoU >= 0.5. The results differ only where GT boxes (or
   a GT and a crowd region) overlap so much that one detection reaches 0.5 with two of them.
3. ``maxDets`` is per image and per category in COCO; with the large value used here nothing is cut,
   whereas COCO's default (100) would drop low-scored detections of crowded images.
"""

from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np

from vspa.evaluation.voc import parse_image
from vspa.utils import VspaError

MAX_DETS = 1_000_000
DETECTRON2_MAX_DETS = 100  # detectron2's COCOEvaluator default (max_dets_per_image), as the field reports AP50


def coco_ap50(
    detections: Sequence[Mapping],
    ground_truths: Sequence[Mapping],
    class_names: Sequence[str],
    max_dets: int = MAX_DETS,
    iou: float = 0.5,
) -> dict:
    """``{"mAP": .., "AP": {class: ..}}`` in percent via pycocotools; ``None`` for classes without GT.

    ``max_dets`` is COCOeval's per-image cap (per category); ``DETECTRON2_MAX_DETS`` gives the COCO-style AP50
    that detectron2-based papers (Adaptive Teacher, CMT, ALDI) print; the default cuts nothing."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(ground_truths):
        raise VspaError(
            f"coco_ap50: {len(detections)} detection entries but {len(ground_truths)} ground-truth entries."
        )
    num_classes = len(class_names)
    images, annotations, results = [], [], []

    def xywh(box: np.ndarray) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    for index, (det, gt) in enumerate(zip(detections, ground_truths)):
        d_boxes, d_labels, d_scores, g_boxes, g_labels, i_boxes, i_labels = parse_image(det, gt, index, num_classes)
        images.append({"id": index})
        gt_items = [(b, int(lab), 0) for b, lab in zip(g_boxes, g_labels)]
        for k, box in enumerate(i_boxes):  # a class-agnostic ignore region is a crowd box of every class
            labels = range(1, num_classes + 1) if i_labels is None else [int(i_labels[k])]
            gt_items += [(box, lab, 1) for lab in labels]
        for box, label, crowd in gt_items:
            bbox = xywh(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": label,
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": crowd,
                }
            )
        results += [
            {"image_id": index, "category_id": int(lab), "bbox": xywh(b), "score": float(s)}
            for b, lab, s in zip(d_boxes, d_labels, d_scores)
        ]

    n_gt = np.bincount([a["category_id"] - 1 for a in annotations if not a["iscrowd"]], minlength=num_classes)
    ap: dict[str, float | None] = {name: (0.0 if n_gt[c] else None) for c, name in enumerate(class_names)}
    if results:  # pycocotools cannot load an empty result list; with no detections every AP is 0
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c + 1, "name": n} for c, n in enumerate(class_names)],
            }
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
            ev.params.iouThrs = np.array([float(iou)])
            ev.params.areaRng = [[0.0, 1e10]]
            ev.params.areaRngLbl = ["all"]
            ev.params.maxDets = [int(max_dets)]
            ev.evaluate()
            ev.accumulate()
        precision = ev.eval["precision"]  # [T=1, R=101, K, A=1, M=1]; -1 where the class has no GT
        for c, name in enumerate(class_names):
            p = precision[0, :, c, 0, -1]
            if n_gt[c]:
                ap[name] = float(np.mean(np.clip(p, 0, None))) * 100.0
    valid = [v for v in ap.values() if v is not None]
    return {"mAP": float(np.mean(valid)) if valid else None, "AP": ap}
