"""The detector: torchvision Faster R-CNN with composable parts for adaptation and memory extraction.

``Detector`` wraps a ``torchvision.models.detection.FasterRCNN`` (``.model``) whose box head is a
``TwoMLPHead`` with a 1024-d output: the instance embedding. Besides torchvision's ``forward`` it exposes
the steps of a forward pass (``prepare`` -> ``backbone_features`` -> ``supervised_losses``, ``pool`` ->
``embed``, ``pool_background``) so the adaptation code can run them one at a time, e.g. to get the
individual losses on pseudo-labels or the embedding of a given box.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign

from vspa.config import check_number, parse_section
from vspa.detection.backbones import BACKBONES, DEFAULT_ANCHOR_SIZES, Float32Forward, build_backbone
from vspa.detection.roi_align import FastMultiScaleRoIAlign
from vspa.utils import VspaError

EMBED_DIM = 1024
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


@dataclass(kw_only=True)
class DetectorConfig:
    """Everything that defines the detector's structure (the ``model:`` params section, parsed by
    :meth:`from_params` / :func:`vspa.config.parse_section`).

    The values are in conf/config.yaml and the scenario presets (composed into params.yaml); a field has a default
    here only when no conf file states it (tests/test_config_defaults.py), and such a key may be added to the
    ``model:`` section (or a preset) to override it. Keyword-only, so the fields keep their order (that of
    :meth:`to_dict`, stored in every checkpoint) whichever have defaults.
    """

    backbone: str
    pretrained_weights: str | None
    from_scratch: bool  # real-data presets: train an ImageNet backbone from random weights on purpose
    min_size: int  # resize: shorter side
    max_size: int  # resize: longer side at most
    small_width: int = 16  # base width of the 'small' backbone (output channels = 4x)
    anchor_sizes: list[int] | None = None  # None: the backbone's default (backbones.DEFAULT_ANCHOR_SIZES)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0])  # height / width
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 2000
    rpn_post_nms_top_n_test: int = 500
    rpn_batch_size_per_image: int = 256
    rpn_fg_iou_thresh: float = 0.5  # anchors with IoU >= this are RPN positives (torchvision: 0.7)
    rpn_bg_iou_thresh: float = 0.3  # ... and < this negatives
    box_batch_size_per_image: int
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.0  # keep everything: evaluation wants the full precision/recall curve
    box_nms_thresh: float = 0.5

    @classmethod
    def from_params(cls, model: dict | None, path: str = "params.yaml") -> "DetectorConfig":
        """The effective ``model`` section parsed by :func:`vspa.config.parse_section` (``null`` = the default;
        unknown keys, wrong types and bad values are VspaErrors naming ``path`` and the key)."""
        return parse_section(cls, model, "model", path)

    def validate(self, name: str = "model", path: str = "params.yaml") -> None:
        """Value checks (the types are parse_section's); also run by build_detector on a config built in code."""
        if self.backbone not in BACKBONES:
            raise VspaError(
                f"{path}: unknown {name}.backbone '{self.backbone}'. Choose one of: {', '.join(BACKBONES)}."
            )
        for key in ("min_size", "max_size", "small_width", "box_batch_size_per_image", "rpn_batch_size_per_image"):
            value = getattr(self, key)
            check_number(isinstance(value, int) and value > 0, value, f"{name}.{key}", "a positive integer", path)
        if self.min_size > self.max_size:
            raise VspaError(
                f"{path}: {name}.min_size ({self.min_size}) is larger than {name}.max_size ({self.max_size})."
            )
        if not 0 < self.rpn_bg_iou_thresh <= self.rpn_fg_iou_thresh <= 1:
            raise VspaError(
                f"{path}: need 0 < {name}.rpn_bg_iou_thresh <= {name}.rpn_fg_iou_thresh <= 1, got "
                f"{self.rpn_bg_iou_thresh!r} and {self.rpn_fg_iou_thresh!r}."
            )
        if self.anchor_sizes is not None and (not self.anchor_sizes or min(self.anchor_sizes) <= 0):
            raise VspaError(
                f"{path}: {name}.anchor_sizes must be a non-empty list of positive sizes in pixels, got "
                f"{self.anchor_sizes!r}."
            )
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise VspaError(
                f"{path}: {name}.aspect_ratios must be a non-empty list of positive height / width ratios, got "
                f"{self.aspect_ratios!r}."
            )

    def effective_anchor_sizes(self) -> tuple[int, ...]:
        return tuple(self.anchor_sizes or DEFAULT_ANCHOR_SIZES[self.backbone])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Detector(nn.Module):
    """Faster R-CNN (``self.model``) plus the composable steps listed in docs/architecture.md."""

    def __init__(self, model: FasterRCNN, cfg: DetectorConfig, num_classes: int, stride: int) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.num_classes = num_classes  # without background
        self.feature_channels = model.backbone.out_channels
        self.embed_dim = EMBED_DIM
        self.stride = stride  # of the pooled feature map, in pixels of the resized image

    # ------------------------------------------------------------------ whole model

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """torchvision semantics: a dict of losses in train mode, a list of detections in eval mode."""
        return self.model(images, targets)

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (``boxes`` xyxy in original image pixels, ``labels`` 1..C, ``scores``), in eval mode.

        The module is switched to eval mode for the call and back afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            return self.model(images)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ steps

    def prepare(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Normalise and resize (the model's own transform): ``(ImageList, targets in resized coords)``."""
        return self.model.transform(images, targets)

    def backbone_features(self, image_list: ImageList) -> "OrderedDict[str, torch.Tensor]":
        features = self.model.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        return OrderedDict(features)

    def supervised_losses(self, image_list: ImageList, features: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """RPN and ROI losses for ``targets`` (already in the ``image_list``'s coordinates; train mode only).

        Same numbers as ``forward(images, targets)`` in train mode, given the same random state (the RPN
        and ROI samplers draw from torch's global generator).
        """
        if not self.training:
            raise RuntimeError("Detector.supervised_losses needs train mode (call detector.train()).")
        for i, target in enumerate(targets):
            boxes = target["boxes"]
            if (boxes[:, 2:] <= boxes[:, :2]).any():
                raise ValueError(f"target {i} has a box with non-positive width or height: {boxes.tolist()}")
        proposals, rpn_losses = self.model.rpn(image_list, features, targets)
        _, roi_losses = self.model.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**roi_losses, **rpn_losses}

    @property
    def _pooler(self) -> MultiScaleRoIAlign:
        return self.model.roi_heads.box_roi_pool

    def pool(self, features: dict, boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """ROIAlign at ``boxes`` (one xyxy tensor per image, resized-image pixels): ``[K, C, 7, 7]``."""
        return self._pooler(features, boxes, image_sizes)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """The box head (TwoMLPHead): pooled features ``[K, C, 7, 7]`` -> instance embeddings ``[K, 1024]``."""
        return self.model.roi_heads.box_head(pooled)

    def pool_background(
        self, features: dict, boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Background feature of each image: ``[B, C, 7, 7]``.

        For image b, take the part of the feature map that covers the image (cells whose centre lies inside
        ``image_sizes[b]``, so padding added for batching is ignored), set to 0 every cell whose centre
        ``((j + 0.5) * stride, (i + 0.5) * stride)`` falls inside one of ``boxes[b]`` (xyxy, resized-image
        pixels, edges inclusive), and adaptive-average-pool the result to the pooler's output size.
        """
        fmap = features[self._pooler.featmap_names[0]]
        out = []
        for b, (height, width) in enumerate(image_sizes):
            rows = min(fmap.shape[-2], max(1, math.ceil(height / self.stride - 0.5)))
            cols = min(fmap.shape[-1], max(1, math.ceil(width / self.stride - 0.5)))
            mask = background_mask(boxes[b], rows, cols, self.stride).to(fmap.dtype)
            out.append(F.adaptive_avg_pool2d(fmap[b, :, :rows, :cols] * mask, self._pooler.output_size))
        if not out:
            return fmap.new_zeros((0, fmap.shape[1], *self._pooler.output_size))
        return torch.stack(out)


def background_mask(boxes: torch.Tensor, rows: int, cols: int, stride: float) -> torch.Tensor:
    """``[rows, cols]`` tensor: 1 where the cell centre is outside every box, 0 inside (edges inclusive)."""
    device = boxes.device
    cy = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * stride
    if boxes.numel() == 0:
        return torch.ones(rows, cols, device=device)
    b = boxes.to(torch.float32)
    inside_y = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] <= b[:, 3:4])  # [N, rows]
    inside_x = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] <= b[:, 2:3])  # [N, cols]
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).any(dim=0)
    return (~inside).to(torch.float32)


class Conv2dFP32(Float32Forward, nn.Conv2d):
    """``nn.Conv2d`` computed in float32 also under autocast (see :func:`keep_outputs_in_float32`)."""


class LinearFP32(Float32Forward, nn.Linear):
    """``nn.Linear`` computed in float32 also under autocast (see :func:`keep_outputs_in_float32`)."""


def keep_outputs_in_float32(model: FasterRCNN) -> None:
    """Make the layers that output logits and box deltas (the RPN head's two 1x1 convolutions, the box
    predictor's two linear layers) run in float32 under mixed precision (``amp: true``).

    Under autocast they would return 16-bit deltas, and torchvision decodes boxes in the deltas' dtype: in
    bfloat16 (8 bits of mantissa) a coordinate near 300 px is rounded to 2 px, which moves the proposals, the
    teacher's pseudo-labels and the detections of 5-px-wide pedestrians. These layers cost ~1-2% of an
    iteration (in float32 the two 1x1 convolutions take torch's slow CPU path); the expensive ones (backbone,
    RPN 3x3 conv, box head) stay in 16 bits. Done by changing the modules' classes to float32 subclasses, so
    the parameters, their names and the float32 path are unchanged.
    """
    swaps = {nn.Conv2d: Conv2dFP32, nn.Linear: LinearFP32}
    for module in (
        model.rpn.head.cls_logits,
        model.rpn.head.bbox_pred,
        model.roi_heads.box_predictor.cls_score,
        model.roi_heads.box_predictor.bbox_pred,
    ):
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]


def build_detector(cfg: DetectorConfig, num_classes: int, load_weights: bool = True) -> Detector:
    """A Faster R-CNN for ``num_classes`` classes (without background) as ``cfg`` describes.

    ``load_weights=False`` skips reading ``cfg.pretrained_weights`` (used when loading a checkpoint).
    """
    if num_classes < 1:
        raise VspaError(f"build_detector: the dataset has {num_classes} classes; it needs at least one category.")
    cfg.validate()
    backbone = build_backbone(cfg.backbone, cfg.pretrained_weights, cfg.small_width, load_weights=load_weights)
    anchors = AnchorGenerator(
        sizes=(cfg.effective_anchor_sizes(),), aspect_ratios=(tuple(float(a) for a in cfg.aspect_ratios),)
    )
    pooler = FastMultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, EMBED_DIM)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler,
        box_head=box_head,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
    )
    keep_outputs_in_float32(model)
    return Detector(model, cfg, num_classes, backbone.stride)
