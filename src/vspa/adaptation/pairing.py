"""Controlled pairs for the visual-similarity experiment (paper 3.2, Fig. 1(b)): ``fg_mode: pairing``.

Instead of retrieving the most similar memory entry, each target object (FoggyAugSim) is aligned with a
source version of *the same object* whose appearance differs in exactly the attributes the mode names:

- ``exact``: the same appearance (fog is the only difference);
- ``color``: colour changed; ``flip``: mirrored; ``color_flip``: both.

An object's appearance is a pair of flags (recoloured, mirrored), named by the variants of
:mod:`vspa.data.augsim` (``none``, ``color``, ``flip``, ``color_flip``). A target object whose AugSim
variant is ``v`` is paired, in mode ``m``, with the source version ``v XOR m``. So that this version
always exists, the pairing memory holds every object in all four appearances: the original source split
(``none``) and one variant set per changed variant (:func:`vspa.data.augsim.make_variant_set`, every image
transformed). Those sets are generated from the original split, never from AugSim: transforming an
already transformed image twice would give a different picture (the flip's background fill is not
undone by a second flip), while the transforms applied once are deterministic, so the ``v`` version is
bit-identical to the object as AugSim shows it.

The weak augmentation of the mean teacher mirrors a target image with probability 0.5, which mirrors
every object in it. The counterpart of an object in a mirrored image is then ``v XOR m XOR flip``, so the
promise "differs in exactly the named attributes" also holds for the images the student actually sees.
:class:`PairingBank` therefore holds, per object, the counterpart features for both cases.

The trainer's side (``fg_mode: pairing``, ``pairing_mode: exact|color|flip|color_flip``):

1. before training, ``table = PairTable.build(original_dir, variants_dir, target_dir)`` and
   ``bank = PairingBank.extract(detector, table, mode)``; at every memory refresh the bank is
   extracted again with the refresh model; ``bank.state_dict()`` goes into the resumable state;
2. the target images' weak-view targets (``boxes``, ``object_ids``, ``flipped``) are kept; for the
   anchors of a batch (boxes in the resized coordinates), ``object_ids, mirrored =
   anchor_object_ids(boxes, pair_targets, original_sizes, image_sizes)`` (IoU >= 0.5 with a ground-truth
   box: the experiment pairs by identity, so it reads the target's boxes and ids, never its labels);
3. ``pairing_triplets(bank, retriever, anchors, labels, object_ids, mirrored, generator)`` -> the
   :class:`vspa.adaptation.align.Triplets` of the foreground loss (unmatched anchors are dropped; the
   negative is drawn from the usual memory as in ``fg_mode: memory``).

Size (~410 lines, just over the project's ~400): the pair table, its dataset and the bank that serves the
triplets are one mechanism used only by ``fg_mode: pairing``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou
from tqdm import tqdm

from vspa.adaptation.align import Triplets
from vspa.data.augsim import CHANGED_VARIANTS, VARIANT_FLAGS, VARIANTS, variant_from_flags
from vspa.data.coco import CocoData, DetectionDataset, collate_fn, load_coco
from vspa.memory.extract import embed_batch
from vspa.memory.retrieval import Retriever
from vspa.utils import VspaError

PAIRING_MODES = ("exact", "color", "flip", "color_flip")
MODE_FLAGS = {"exact": (False, False), "color": (True, False), "flip": (False, True), "color_flip": (True, True)}
"""mode -> (colour differs, orientation differs)."""
REBUILD = "Rebuild the sets with `dvc repro augsim`."


def check_mode(mode: str) -> str:
    if mode not in MODE_FLAGS:
        raise VspaError(f"params.yaml: adapt.pairing_mode '{mode}' is unknown. Use one of: {', '.join(PAIRING_MODES)}.")
    return mode


def counterpart_variant(target_variant: str, mode: str, mirrored: bool = False) -> str:
    """The appearance to pair with a target object of appearance ``target_variant`` in ``mode``; with
    ``mirrored`` the target image was mirrored by the augmentation (its orientation flag is toggled)."""
    color, flip = VARIANT_FLAGS[target_variant]
    mode_color, mode_flip = MODE_FLAGS[check_mode(mode)]
    return variant_from_flags(color ^ mode_color, flip ^ mode_flip ^ bool(mirrored))


def differing_attributes(a: str, b: str) -> set[str]:
    """Which of ``{"color", "flip"}`` differ between two appearances."""
    (ca, fa), (cb, fb) = VARIANT_FLAGS[a], VARIANT_FLAGS[b]
    return {name for name, differs in (("color", ca != cb), ("flip", fa != fb)) if differs}


@dataclass(frozen=True)
class Counterpart:
    """Where the source version of one object lies: split folder, image id and annotation id."""

    object_id: int
    variant: str
    split_dir: Path
    image_id: int
    annotation_id: int


def _objects(coco: CocoData) -> dict[int, dict]:
    """object id -> annotation (crowd regions skipped); raises on a missing or duplicate ``object_id``."""
    out: dict[int, dict] = {}
    for anns in coco.annotations_by_image.values():
        for ann in anns:
            if ann.get("iscrowd", 0):
                continue
            oid = ann.get("object_id")
            if not isinstance(oid, int) or isinstance(oid, bool):
                raise VspaError(
                    f"{coco.json_path}: annotation id={ann['id']} has no integer 'object_id', so it cannot be "
                    f"paired with its counterparts. {REBUILD}"
                )
            if oid in out:
                raise VspaError(
                    f"{coco.json_path}: object_id={oid} is used by annotations id={out[oid]['id']} and "
                    f"id={ann['id']}; object ids must be unique. {REBUILD}"
                )
            out[oid] = ann
    return out


def _variant_of(coco: CocoData, ann: dict) -> str:
    variant = (ann.get("augsim") or {}).get("variant")
    if variant not in VARIANTS:
        raise VspaError(
            f"{coco.json_path}: annotation id={ann['id']} has augsim.variant {variant!r}, expected one of "
            f"{VARIANTS}. Use a set written by vspa.data.augsim (make_augsim / make_foggy). {REBUILD}"
        )
    return variant


class PairTable:
    """object id -> its location in each appearance, and its appearance in the target set.

    ``split_dirs[v]``: the folder holding every object in appearance ``v``; ``locations[v][object_id]``:
    ``(image_id, annotation_id)`` there; ``target_variant[object_id]``: the object's AugSim variant.
    """

    def __init__(
        self,
        split_dirs: dict[str, Path],
        locations: dict[str, dict[int, tuple[int, int]]],
        target_variant: dict[int, str],
        class_names: list[str],
    ):
        self.split_dirs = split_dirs
        self.locations = locations
        self.target_variant = target_variant
        self.class_names = class_names

    @property
    def object_ids(self) -> list[int]:
        """The target objects, in increasing id order."""
        return sorted(self.target_variant)

    @classmethod
    def build(
        cls, original_dir: str | os.PathLike, variants_dir: str | os.PathLike, target_dir: str | os.PathLike
    ) -> "PairTable":
        """From the original source split, the folder of variant sets (``<variants_dir>/<variant>/`` for
        ``color``, ``flip``, ``color_flip``) and the target set (FoggyAugSim) whose objects are paired.

        Checks that every set holds the same objects at the same image and annotation ids, and that every
        target object is one of them; raises ``VspaError`` naming the set and the object otherwise.
        """
        split_dirs = {"none": Path(original_dir)}
        split_dirs.update({v: Path(variants_dir) / v for v in CHANGED_VARIANTS})
        locations: dict[str, dict[int, tuple[int, int]]] = {}
        reference: dict[int, dict] = {}
        class_names: list[str] = []
        for variant in VARIANTS:
            json_path = split_dirs[variant] / "annotations.json"
            if not json_path.is_file():
                raise VspaError(f"{json_path}: the '{variant}' set of the pairing memory is missing. {REBUILD}")
            coco = load_coco(json_path, check_images=False)
            objects = _objects(coco)
            if variant == "none":
                reference, class_names = objects, list(coco.categories)
            else:
                if coco.categories != class_names:
                    raise VspaError(
                        f"{json_path}: classes {coco.categories} differ from the original set's {class_names}. "
                        f"{REBUILD}"
                    )
                for oid, ann in objects.items():
                    if _variant_of(coco, ann) != variant:
                        raise VspaError(
                            f"{json_path}: object_id={oid} is marked augsim.variant "
                            f"'{ann['augsim']['variant']}' in the '{variant}' set. {REBUILD}"
                        )
                _check_same_objects(json_path, variant, objects, reference, split_dirs["none"])
            locations[variant] = {oid: (ann["image_id"], ann["id"]) for oid, ann in objects.items()}
        target_json = Path(target_dir) / "annotations.json"
        target = load_coco(target_json, check_images=False)
        target_variant = {}
        for oid, ann in _objects(target).items():
            if oid not in reference:
                raise VspaError(
                    f"{target_json}: object_id={oid} (annotation id={ann['id']}) has no counterpart in the original "
                    f"set {split_dirs['none']}. Make the target from that set's AugSim. {REBUILD}"
                )
            target_variant[oid] = _variant_of(target, ann)
        return cls(split_dirs, locations, target_variant, class_names)

    def counterpart(self, object_ids, mode: str, mirrored=False) -> list[Counterpart]:
        """The source counterpart of each target object in ``mode`` (``mirrored``: one flag or one per id)."""
        check_mode(mode)
        ids = [int(o) for o in object_ids]
        flags = [bool(m) for m in np.broadcast_to(np.asarray(mirrored, dtype=bool), (len(ids),))]
        rows = []
        for oid, mirror in zip(ids, flags):
            if oid not in self.target_variant:
                raise VspaError(f"pairing: target object_id={oid} is not in the pair table. {REBUILD}")
            variant = counterpart_variant(self.target_variant[oid], mode, mirror)
            image_id, ann_id = self.locations[variant][oid]
            rows.append(Counterpart(oid, variant, self.split_dirs[variant], image_id, ann_id))
        return rows


def _check_same_objects(json_path: Path, variant: str, objects: dict, reference: dict, original: Path) -> None:
    missing = sorted(set(reference) - set(objects))
    extra = sorted(set(objects) - set(reference))
    moved = [
        o
        for o in set(objects) & set(reference)
        if (objects[o]["image_id"], objects[o]["id"]) != (reference[o]["image_id"], reference[o]["id"])
    ]
    if missing or extra or moved:
        raise VspaError(
            f"{json_path}: the '{variant}' set does not hold the objects of {original} "
            f"(missing object ids {missing[:5]}, unknown {extra[:5]}, "
            f"at other image/annotation ids {sorted(moved)[:5]}). "
            f"{REBUILD}"
        )


# --------------------------------------------------------------------------- counterpart features


class CounterpartDataset(Dataset):
    """The images holding the counterparts of every target object in ``mode``, for both mirror states.

    One item per (appearance, image): ``(image, target)`` as :class:`DetectionDataset` gives it, with the
    objects restricted to the counterparts found there and ``target["mirrored"]`` (Bool[N]) saying for
    which mirror state of the target image each one is the counterpart.
    """

    def __init__(self, table: PairTable, mode: str, mirror_states: tuple[bool, ...] = (False, True)):
        groups: dict[tuple[str, int], dict[int, bool]] = defaultdict(dict)
        for mirrored in mirror_states:
            for row in table.counterpart(table.object_ids, mode, mirrored):
                groups[(row.variant, row.image_id)][row.object_id] = mirrored
        self.items = sorted(groups.items())
        self.datasets: dict[str, DetectionDataset] = {}
        self.index_of: dict[str, dict[int, int]] = {}
        for variant in sorted({variant for (variant, _), _ in self.items}):
            ds = DetectionDataset(table.split_dirs[variant] / "annotations.json", check_images=False)
            self.datasets[variant] = ds
            self.index_of[variant] = {img["id"]: i for i, img in enumerate(ds.coco.images)}
        self.class_names = list(table.class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        (variant, image_id), mirrored_of = self.items[index]
        image, target = self.datasets[variant][self.index_of[variant][image_id]]
        keep = torch.tensor([int(o) in mirrored_of for o in target["object_ids"]], dtype=torch.bool)
        out = {
            **target,
            "boxes": target["boxes"][keep],
            "labels": target["labels"][keep],
            "object_ids": target["object_ids"][keep],
        }
        out["mirrored"] = torch.tensor([mirrored_of[int(o)] for o in out["object_ids"]], dtype=torch.bool)
        return image, out


class PairingBank:
    """Counterpart features of one mode: for each target object and mirror state, one L2-normalised
    box-head embedding of its source counterpart."""

    def __init__(self, mode: str, object_ids: np.ndarray, features: torch.Tensor):
        """``object_ids`` [N] increasing; ``features`` [2, N, D] (index 0: target image as is, 1: mirrored)."""
        self.mode = check_mode(mode)
        self.object_ids = torch.as_tensor(np.asarray(object_ids, dtype=np.int64))
        self.features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=-1)

    def __len__(self) -> int:
        return len(self.object_ids)

    @classmethod
    @torch.no_grad()
    def extract(
        cls,
        detector,
        table: PairTable,
        mode: str,
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> "PairingBank":
        """Embed every counterpart with ``detector`` on its own device (its pooler and box head on the
        ground-truth box, in eval mode as for the memory: :func:`vspa.memory.extract.embed_batch`); the
        detector's train/eval mode is restored afterwards. The bank itself is kept on the CPU."""
        dataset = CounterpartDataset(table, mode)
        if dataset.num_classes != detector.num_classes:
            raise VspaError(
                f"pairing: the source set has {dataset.num_classes} classes {dataset.class_names} but the detector "
                f"has {detector.num_classes}. Use the detector trained on this source set."
            )
        object_ids = np.asarray(table.object_ids, dtype=np.int64)
        features = torch.zeros(2, len(object_ids), detector.embed_dim)
        filled = torch.zeros(2, len(object_ids), dtype=torch.bool)
        device = next(detector.parameters()).device
        was_training = detector.training
        detector.eval()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
        try:
            for images, targets in tqdm(
                loader, desc=f"pairing bank ({mode})", unit="batch", disable=None if progress is None else not progress
            ):
                rows = embed_batch(detector, [im.to(device) for im in images], targets)["fg"]
                if rows is None:
                    continue
                mirrored = torch.cat([t["mirrored"] for t in targets]).long()
                where = torch.as_tensor(np.searchsorted(object_ids, rows["object_ids"]))
                features[mirrored, where] = torch.as_tensor(rows["features"])
                filled[mirrored, where] = True
        finally:
            detector.train(was_training)
        if not filled.all():
            missing = object_ids[(~filled).any(dim=0).numpy()]
            raise VspaError(f"pairing: no counterpart feature for target object ids {missing[:5].tolist()}. {REBUILD}")
        return cls(mode, object_ids, features)

    def state_dict(self) -> dict:
        """Plain tensors for the trainer's resumable state (the bank in use depends on the last refresh)."""
        return {"mode": self.mode, "object_ids": self.object_ids.clone(), "features": self.features.clone()}

    @classmethod
    def from_state(cls, state: dict) -> "PairingBank":
        return cls(state["mode"], state["object_ids"].numpy(), state["features"])

    def positives(self, object_ids: torch.Tensor, mirrored) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [K, D], found Bool[K])`` for target object ids [K] (``-1`` or unknown ids: not found)
        seen in an image that was (``mirrored`` True) or was not mirrored; one flag or one per id."""
        ids = torch.as_tensor(object_ids, dtype=torch.int64).cpu()
        mirror = torch.as_tensor(mirrored, dtype=torch.bool).cpu().expand(len(ids)).long()
        pos = torch.searchsorted(self.object_ids, ids).clamp_max(max(len(self.object_ids) - 1, 0))
        found = (self.object_ids[pos] == ids) if len(self.object_ids) else torch.zeros(len(ids), dtype=torch.bool)
        return self.features[mirror, pos], found


def match_object_ids(
    boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_object_ids: torch.Tensor, iou: float = 0.5
) -> torch.Tensor:
    """For each box [K, 4] (xyxy), the ``object_id`` of the ground-truth box it overlaps most if that IoU
    is at least ``iou``, else -1."""
    out = torch.full((len(boxes),), -1, dtype=torch.int64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return out
    best, where = box_iou(boxes.detach().float().cpu(), gt_boxes.float().cpu()).max(dim=1)
    hit = best >= iou
    out[hit] = torch.as_tensor(gt_object_ids, dtype=torch.int64).cpu()[where[hit]]
    return out


def anchor_object_ids(
    boxes: list[torch.Tensor],
    pair_targets: list[dict],
    original_sizes: list[tuple[int, int]],
    image_sizes: list[tuple[int, int]],
    iou: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(object_ids [K], mirrored Bool[K])`` for the anchors of a batch, concatenated over the images.

    ``boxes[i]``: image ``i``'s anchor boxes in the detector's resized coordinates (as ``Detector.prepare``
    returns them); ``pair_targets[i]``: the target image's weak-view target (``boxes`` in its original
    coordinates, ``object_ids``, ``flipped``); ``original_sizes`` / ``image_sizes``: ``(H, W)`` before and
    after ``prepare``. The ground-truth boxes are scaled as torchvision's resize scales boxes, then
    :func:`match_object_ids`.
    """
    ids, mirrored = [], []
    for anchor_boxes, target, (h0, w0), (h1, w1) in zip(boxes, pair_targets, original_sizes, image_sizes):
        scale = torch.tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0])
        ids.append(match_object_ids(anchor_boxes, target["boxes"].float().cpu() * scale, target["object_ids"], iou))
        mirrored.append(torch.full((len(anchor_boxes),), bool(target.get("flipped", False))))
    if not ids:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(ids), torch.cat(mirrored)


def pairing_triplets(
    bank: PairingBank,
    retriever: Retriever,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    object_ids: torch.Tensor,
    mirrored,
    generator: torch.Generator,
) -> Triplets:
    """``fg_mode: pairing``: positive = the counterpart of the anchor's matched target object; anchors that
    match no object (id -1) are dropped. Negative: a random memory entry of another class (or a random
    background entry with one class), exactly as ``fg_mode: memory`` draws it."""
    positive, found = bank.positives(object_ids, mirrored)
    labels = torch.as_tensor(labels)
    anchors, labels = anchors[found.to(anchors.device)], labels[found.to(labels.device)]
    positive = positive[found].to(anchors.device)
    neg_idx = retriever.random_negative(labels, generator)
    negative = retriever.bg_vectors(neg_idx) if retriever.negatives_from_background else retriever.fg_vectors(neg_idx)
    return Triplets(anchors, positive, negative.to(anchors.device))
