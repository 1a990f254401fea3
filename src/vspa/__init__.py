"""vspa: visually similar pair alignment for cross-domain object detection."""

__version__ = "0.1.0"
