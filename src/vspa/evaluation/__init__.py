"""Detection metrics: VOC AP at IoU 0.5 per class and mAP, a pycocotools cross-check, and the runner
that evaluates a checkpoint on a dataset split."""

from vspa.evaluation.coco_check import coco_ap50
from vspa.evaluation.voc import ClassEval, EvalResult, evaluate_detections, voc_ap

__all__ = ["ClassEval", "EvalResult", "coco_ap50", "evaluate_detections", "voc_ap"]
