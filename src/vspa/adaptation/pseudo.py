"""Pseudo-labels: the teacher's detections (already after the detector's class-wise NMS) with score >= tau."""

from __future__ import annotations

import torch

from vspa.utils import VspaError


def filter_pseudo_labels(detections: list[dict], tau: float) -> list[dict]:
    """Keep, per image, the detections whose score is >= ``tau``.

    ``detections``: one dict per image with ``boxes`` [N, 4], ``labels`` [N] and ``scores`` [N], as returned by
    ``Detector.detect`` (post-processed: NMS done). Returns one dict per image with ``boxes`` (float32),
    ``labels`` (int64) and ``scores`` of the kept detections; an image with none keeps empty tensors (shape
    [0, 4] / [0]), which the detector's losses accept as "all background".
    """
    if not 0.0 <= tau <= 1.0:
        raise VspaError(f"params.yaml: adapt.tau = {tau} is outside [0, 1]. Use a score threshold such as 0.8.")
    out = []
    for i, det in enumerate(detections):
        missing = {"boxes", "labels", "scores"} - set(det)
        if missing:
            raise VspaError(f"detection {i} lacks {sorted(missing)}; pass Detector.detect output.")
        keep = det["scores"] >= tau
        out.append(
            {
                "boxes": det["boxes"][keep].reshape(-1, 4).to(torch.float32),
                "labels": det["labels"][keep].to(torch.int64),
                "scores": det["scores"][keep],
            }
        )
    return out
