"""Pascal VOC detection metric: AP at one IoU threshold per class, all-point interpolation, and mAP.

Conventions (the VOC2010+ devkit, as detectron2's ``PascalVOCDetectionEvaluator`` with
``use_07_metric=False``), with the differences stated:

- IoU is continuous: ``area = (x2 - x1) * (y2 - y1)``, no ``+1`` pixel (the devkit adds 1).
- A detection is a match when IoU >= ``iou_threshold`` (the MATLAB devkit and COCO use >=).
- Detections of a class are processed in descending score over the whole split; ties keep input order
  (image order, then the order inside the image): a stable sort.
- Each detection goes to the ground truth (GT) of its class in its image with the highest IoU. If that
  IoU reaches the threshold, the detection is a true positive when the GT is still free and a false
  positive (a duplicate) when a higher-scored detection already took it; the devkit does not fall back to
  the second-best GT (COCO does).
- Ignore regions (``ignore_boxes``, e.g. COCO ``iscrowd`` or VOC ``difficult``): a detection that matched
  no GT, and whose intersection with an ignore region covers >= ``iou_threshold`` of the detection's own
  area (the COCO crowd rule), is dropped: neither true nor false positive. Ignore regions never count
  as GT and may absorb any number of detections.
- AP = area under the precision envelope (precision made monotone from the right), summed over the
  points where recall changes. mAP = mean AP over the classes that have at least one GT; a class
  without GT has AP ``None`` (``null`` in JSON) and is left out of the mean.

Labels are contiguous ``1..C`` (``class_names[0]`` is label 1), as everywhere in the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from vspa.utils import VspaError


# --------------------------------------------------------------------------- AP from a PR curve


def voc_ap(recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray) -> float:
    """All-point interpolated AP of one PR curve (points in descending-score order).

    AP = sum over recall steps of (r[i+1] - r[i]) * max(precision at recall >= r[i+1]). An empty curve
    (no detections) has AP 0.
    """
    rec = np.asarray(recall, dtype=np.float64).ravel()
    prec = np.asarray(precision, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise VspaError(f"voc_ap: recall has {rec.size} points but precision has {prec.size}; pass one pair per point.")
    if rec.size == 0:
        return 0.0
    if np.any(np.diff(rec) < 0):
        raise VspaError("voc_ap: recall must be non-decreasing (points in descending score order).")
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# --------------------------------------------------------------------------- results


@dataclass
class ClassEval:
    """Evaluation of one class. ``ap`` is a fraction in [0, 1], ``None`` when the class has no GT.

    ``recall``, ``precision`` and ``scores`` are the PR curve: one point per counted detection
    (ignored ones left out), in descending score order; empty for a class without GT.
    """

    name: str
    ap: float | None
    n_gt: int
    n_det: int
    n_ignored: int
    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray


@dataclass
class EvalResult:
    classes: list[ClassEval]
    num_images: int
    iou_threshold: float

    @property
    def ap(self) -> dict[str, float | None]:
        return {c.name: c.ap for c in self.classes}

    @property
    def mAP(self) -> float | None:  # noqa: N802 (the metric's name)
        aps = [c.ap for c in self.classes if c.ap is not None]
        return float(np.mean(aps)) if aps else None

    def pr_curves(self) -> dict[str, dict[str, np.ndarray]]:
        """``{class: {"recall": ..., "precision": ..., "scores": ...}}``."""
        return {c.name: {"recall": c.recall, "precision": c.precision, "scores": c.scores} for c in self.classes}

    def to_json(self) -> dict[str, Any]:
        """The metrics JSON layout (AP in percent, rounded to 4 decimals; null for classes without GT)."""

        def pct(x: float | None) -> float | None:
            return None if x is None else round(100.0 * x, 4)

        return {
            "mAP": pct(self.mAP),
            "AP": {c.name: pct(c.ap) for c in self.classes},
            "num_images": self.num_images,
            "num_gt": {c.name: c.n_gt for c in self.classes},
            "num_det": {c.name: c.n_det for c in self.classes},
            "iou_threshold": self.iou_threshold,
            "metric": "voc_ap_all_point",
        }


# --------------------------------------------------------------------------- matching


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N, M] of xyxy boxes, continuous areas; 0 where the union is empty."""
    inter = _intersection(a, b)
    area_a = _area(a)[:, None]
    area_b = _area(b)[None, :]
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over the area of ``a`` ([N, M]): how much of each box in ``a`` lies inside ``b``."""
    inter = _intersection(a, b)
    area_a = np.broadcast_to(_area(a)[:, None], inter.shape)
    return np.divide(inter, area_a, out=np.zeros_like(inter), where=area_a > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    return wh[..., 0] * wh[..., 1]


def _match_image(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, ignore_boxes: np.ndarray, thr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching inside one image for one class; detections already in descending score.

    Returns boolean arrays (true_positive, ignored) over the detections; the rest are false positives.
    """
    n = len(det_boxes)
    tp = np.zeros(n, dtype=bool)
    if len(gt_boxes):
        iou = box_iou(det_boxes, gt_boxes)
        best = iou.argmax(axis=1)
        hit = iou[np.arange(n), best] >= thr
        taken = np.zeros(len(gt_boxes), dtype=bool)
        for i in np.flatnonzero(hit):  # sequential by nature: a GT goes to the first detection that hits it
            if not taken[best[i]]:
                taken[best[i]] = True
                tp[i] = True
    else:
        hit = np.zeros(n, dtype=bool)
    if len(ignore_boxes):
        ignored = ~hit & (box_ioa(det_boxes, ignore_boxes) >= thr).any(axis=1)
    else:
        ignored = np.zeros(n, dtype=bool)
    return tp, ignored


# --------------------------------------------------------------------------- input checks


def _array(value: Any, dtype, shape_tail: tuple[int, ...], where: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, dtype=dtype)
    if arr.size == 0:
        return arr.reshape((0, *shape_tail))
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
        want = "[N" + "".join(f", {s}" for s in shape_tail) + "]"
        raise VspaError(f"{where}: expected shape {want}, got {list(arr.shape)}.")
    if not np.all(np.isfinite(arr)):
        raise VspaError(f"{where}: contains NaN or infinite values.")
    return arr


def _labels(value: Any, n: int, num_classes: int, where: str) -> np.ndarray:
    labels = _array(value, np.float64, (), where)
    if len(labels) != n:
        raise VspaError(f"{where}: {len(labels)} labels for {n} boxes; give one label per box.")
    if n and (np.any(labels != np.round(labels)) or labels.min() < 1 or labels.max() > num_classes):
        raise VspaError(
            f"{where}: labels must be integers in 1..{num_classes} (0 is background), got "
            f"{sorted(set(labels.tolist()))[:10]}. Check that the detector and the dataset share the class list."
        )
    return labels.astype(np.int64)


def parse_image(det: Mapping, gt: Mapping, index: int, num_classes: int):
    """Check and convert one image's detections and GT to numpy; VspaError naming the entry if malformed.

    Returns (det boxes, det labels, det scores, gt boxes, gt labels, ignore boxes, ignore labels or None).
    """
    required = (("detections", det, ("boxes", "labels", "scores")), ("ground_truths", gt, ("boxes", "labels")))
    for what, item, keys in required:
        missing = [k for k in keys if k not in item]
        if missing:
            raise VspaError(f"{what}[{index}]: missing key(s) {missing}; each image needs {list(keys)}.")
    d_boxes = _array(det["boxes"], np.float64, (4,), f"detections[{index}].boxes")
    d_labels = _labels(det["labels"], len(d_boxes), num_classes, f"detections[{index}].labels")
    d_scores = _array(det["scores"], np.float64, (), f"detections[{index}].scores")
    if len(d_scores) != len(d_boxes):
        raise VspaError(f"detections[{index}].scores: {len(d_scores)} scores for {len(d_boxes)} boxes.")
    g_boxes = _array(gt["boxes"], np.float64, (4,), f"ground_truths[{index}].boxes")
    g_labels = _labels(gt["labels"], len(g_boxes), num_classes, f"ground_truths[{index}].labels")
    i_boxes = _array(gt.get("ignore_boxes", ()), np.float64, (4,), f"ground_truths[{index}].ignore_boxes")
    if gt.get("ignore_labels") is None:
        i_labels = None  # ignore regions apply to every class
    else:
        i_labels = _labels(gt["ignore_labels"], len(i_boxes), num_classes, f"ground_truths[{index}].ignore_labels")
    return d_boxes, d_labels, d_scores, g_boxes, g_labels, i_boxes, i_labels


# --------------------------------------------------------------------------- evaluation


def evaluate_detections(
    detections: Sequence[Mapping],
    ground_truths: Sequence[Mapping],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> EvalResult:
    """VOC AP per class and mAP over a split.

    ``detections[i]``: ``boxes`` [N, 4] xyxy, ``labels`` [N] in 1..C, ``scores`` [N] (numpy, lists or
    tensors). ``ground_truths[i]``: ``boxes`` [M, 4], ``labels`` [M], optionally ``ignore_boxes`` [K, 4]
    and ``ignore_labels`` [K] (without labels an ignore region applies to every class). Both lists are
    indexed by image, in the same order.
    """
    if len(detections) != len(ground_truths):
        raise VspaError(
            f"evaluate_detections: {len(detections)} detection entries but {len(ground_truths)} ground-truth "
            "entries; pass one of each per image, in the same order."
        )
    if not 0.0 < iou_threshold <= 1.0:
        raise VspaError(f"evaluate_detections: iou_threshold must be in (0, 1], got {iou_threshold}.")
    num_classes = len(class_names)
    # Per class: lists over images of (scores, tp, ignored) in the image's descending-score order.
    per_class: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(num_classes)]
    n_gt = np.zeros(num_classes, dtype=np.int64)
    for index, (det, gt) in enumerate(zip(detections, ground_truths)):
        d_boxes, d_labels, d_scores, g_boxes, g_labels, i_boxes, i_labels = parse_image(det, gt, index, num_classes)
        n_gt += np.bincount(g_labels - 1, minlength=num_classes)
        for label in np.unique(d_labels):
            sel = np.flatnonzero(d_labels == label)
            sel = sel[np.argsort(-d_scores[sel], kind="stable")]
            ign = i_boxes if i_labels is None else i_boxes[i_labels == label]
            tp, ignored = _match_image(d_boxes[sel], g_boxes[g_labels == label], ign, iou_threshold)
            per_class[label - 1].append((d_scores[sel], tp, ignored))

    classes = []
    for c, name in enumerate(class_names):
        if per_class[c]:
            scores, tp, ignored = (np.concatenate(parts) for parts in zip(*per_class[c]))
        else:
            scores, tp, ignored = np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
        n_det, n_ignored = len(scores), int(ignored.sum())
        keep = ~ignored
        scores, tp = scores[keep], tp[keep]
        order = np.argsort(-scores, kind="stable")
        scores, tp = scores[order], tp[order]
        tp_cum = np.cumsum(tp)
        fp_cum = np.cumsum(~tp)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
        if n_gt[c] > 0:
            recall = tp_cum / n_gt[c]
            ap: float | None = voc_ap(recall, precision)
        else:  # no GT: recall and AP are undefined, so is the curve
            recall, precision, scores = np.zeros(0), np.zeros(0), np.zeros(0)
            ap = None
        classes.append(ClassEval(name, ap, int(n_gt[c]), n_det, n_ignored, recall, precision, scores))
    return EvalResult(classes=classes, num_images=len(ground_truths), iou_threshold=float(iou_threshold))
