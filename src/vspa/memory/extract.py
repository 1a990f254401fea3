"""Extract the source memories (method spec section 3) and stream them to an HDF5 file.

For every image, with the detector in eval mode and its test-time resize:

- foreground: each ground-truth box is pooled with the detector's own box pooler (ROIAlign) and passed
  through the box head -> one embedding per object, stored with class, image id, object id and the box
  in original image pixels;
- background: the feature map with every ground-truth box masked out, adaptive-pooled to the pooler's
  output size, through the box head -> one embedding per image.

Rows are appended to the file in chunks of ``chunk_rows`` (:func:`vspa.memory.store.memory_writer`), so
the memory used does not grow with the dataset; the file appears only once complete.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vspa.memory.store import memory_writer
from vspa.utils import VspaError

KEEP_CHOICES = ("all", "correct")


@dataclass
class ExtractStats:
    images: int
    fg_rows: int  # foreground entries written
    fg_dropped: int  # objects dropped because the detector misclassified them (keep="correct")
    bg_rows: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def _collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


@torch.inference_mode()
def embed_batch(detector, images: list[torch.Tensor], targets: list[dict], keep: str = "all") -> dict:
    """Memory rows of one batch: ``fg`` columns (numpy) for the kept objects, ``bg`` columns, and the
    number of objects dropped by ``keep="correct"``. ``targets`` are in original image coordinates.

    Crowd regions (``ignore_boxes``, if present) are not foreground entries but are masked out of the
    background like the other ground-truth boxes.
    """
    device = images[0].device
    counts = [len(t["boxes"]) for t in targets]
    masked = [torch.cat([t["boxes"], t.get("ignore_boxes", t["boxes"][:0])]).to(device, torch.float32) for t in targets]
    image_list, scaled = detector.prepare(images, [{"boxes": b} for b in masked])  # resize the boxes too
    features = detector.backbone_features(image_list)
    mask_boxes = [t["boxes"] for t in scaled]
    boxes = [b[:n] for b, n in zip(mask_boxes, counts)]
    fg = None
    dropped = 0
    if sum(counts):
        emb = detector.embed(detector.pool(features, boxes, image_list.image_sizes))
        labels = torch.cat([t["labels"] for t in targets]).to(emb.device)
        keep_mask = torch.ones(len(emb), dtype=torch.bool, device=emb.device)
        if keep == "correct":
            logits, _ = detector.model.roi_heads.box_predictor(emb)
            keep_mask = logits.argmax(dim=1) == labels
            dropped = int((~keep_mask).sum())
        keep_np = keep_mask.cpu().numpy()
        image_ids = np.repeat([int(t["image_id"]) for t in targets], counts)
        fg = {
            "features": emb[keep_mask].float().cpu().numpy(),
            "labels": labels[keep_mask].cpu().numpy(),
            "image_ids": image_ids[keep_np],
            "object_ids": torch.cat([t["object_ids"] for t in targets]).cpu().numpy()[keep_np],
            "boxes": torch.cat([t["boxes"] for t in targets]).float().cpu().numpy()[keep_np],
        }
    bg_emb = detector.embed(detector.pool_background(features, mask_boxes, image_list.image_sizes))
    bg = {
        "features": bg_emb.float().cpu().numpy(),
        "image_ids": np.array([int(t["image_id"]) for t in targets], dtype=np.int64),
    }
    return {"fg": fg, "bg": bg, "dropped": dropped}


def extract_memory(
    detector,
    dataset,
    out_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    keep: str = "all",
    batch_size: int = 8,
    chunk_rows: int = 4096,
    attrs: dict | None = None,
    progress: bool | None = None,
    num_workers: int = 0,
) -> ExtractStats:
    """Write the foreground and background memories of ``dataset`` under ``detector`` to ``out_path``.

    ``dataset[i] -> (image [3,H,W] in [0,1], target)`` with target keys ``boxes`` (xyxy, pixels), ``labels``
    (1..C), ``image_id``, ``object_ids`` (the :class:`vspa.data.coco.DetectionDataset` contract); it must
    have ``class_names``. ``keep="correct"`` keeps only objects whose ground-truth box the detector's box
    predictor assigns to the right class. ``attrs`` (e.g. the checkpoint and dataset hashes) are added to
    the file's attributes, with ``class_names`` and ``keep``. ``progress=None`` shows a bar on a terminal.
    """
    if keep not in KEEP_CHOICES:
        raise VspaError(f"params.yaml: extract_memory.keep '{keep}' is unknown. Use 'all' or 'correct'.")
    if batch_size < 1:
        raise VspaError(f"params.yaml: extract_memory.batch_size must be at least 1, got {batch_size}.")
    if len(dataset) == 0:
        raise VspaError(f"{out_path}: the source dataset has no images, so there is nothing to extract.")
    class_names = list(dataset.class_names)
    if len(class_names) != detector.num_classes:
        raise VspaError(
            f"{out_path}: the dataset has {len(class_names)} classes {class_names} but the detector was trained "
            f"for {detector.num_classes}. Extract with the source detector of this dataset."
        )
    device = torch.device(device)
    detector = detector.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    file_attrs = {**(attrs or {}), "class_names": class_names, "keep": keep}
    images = fg_rows = dropped = bg_rows = 0
    start = time.perf_counter()
    with memory_writer(out_path, detector.embed_dim, file_attrs, chunk_rows=chunk_rows) as writer:
        bar = tqdm(loader, desc="extract memory", unit="batch", disable=None if progress is None else not progress)
        for batch_images, targets in bar:
            rows = embed_batch(detector, [im.to(device) for im in batch_images], targets, keep)
            if rows["fg"] is not None:
                writer.append_fg(**rows["fg"])
                fg_rows += len(rows["fg"]["labels"])
            writer.append_bg(**rows["bg"])
            bg_rows += len(rows["bg"]["image_ids"])
            dropped += rows["dropped"]
            images += len(batch_images)
    return ExtractStats(images, fg_rows, dropped, bg_rows, time.perf_counter() - start)
