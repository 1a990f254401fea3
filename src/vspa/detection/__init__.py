"""Faster R-CNN detector (torchvision) with composable parts, checkpoints and supervised training."""

from vspa.detection.model import Detector, DetectorConfig, build_detector

__all__ = ["Detector", "DetectorConfig", "build_detector"]
