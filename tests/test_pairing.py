"""Pairing modes of the visual-similarity experiment (vspa.adaptation.pairing) on the tiny benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import detector_config
from PIL import Image

from vspa.adaptation.pairing import (
    PAIRING_MODES,
    PairingBank,
    PairTable,
    anchor_object_ids,
    counterpart_variant,
    differing_attributes,
    match_object_ids,
    pairing_triplets,
)
from vspa.data.augsim import VARIANT_FLAGS, VARIANTS, make_augsim, make_foggy, make_variant_set
from vspa.data.coco import DetectionDataset
from vspa.data.synth import apply_fog
from vspa.detection.model import build_detector
from vspa.memory.extract import embed_batch
from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank
from vspa.utils import VspaError

NAMED = {"exact": set(), "color": {"color"}, "flip": {"flip"}, "color_flip": {"color", "flip"}}
BETA, AIRLIGHT = 0.04, 0.8


@pytest.fixture(scope="module")
def sets(tiny_benchmark, tmp_path_factory):
    """Original source_train, its variant sets, AugSim (half the images changed) and FoggyAugSim."""
    out = tmp_path_factory.mktemp("pairing")
    src = Path(tiny_benchmark) / "source_train"
    make_augsim(src, out / "augsim", fraction=0.5, seed=0)
    for variant in ("color", "flip", "color_flip"):
        make_variant_set(src, out / "pairing" / variant, variant)
    make_foggy(out / "augsim", out / "foggy", beta=BETA, airlight=AIRLIGHT)
    return {"original": src, "variants": out / "pairing", "augsim": out / "augsim", "target": out / "foggy"}


@pytest.fixture(scope="module")
def table(sets):
    return PairTable.build(sets["original"], sets["variants"], sets["target"])


def _annotations(folder: Path) -> tuple[dict, dict]:
    data = json.loads((folder / "annotations.json").read_text())
    return {a["id"]: a for a in data["annotations"]}, {img["id"]: img for img in data["images"]}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_counterpart_variants_by_hand():
    assert counterpart_variant("none", "exact") == "none"
    assert counterpart_variant("color", "exact") == "color"
    assert counterpart_variant("color", "color") == "none"
    assert counterpart_variant("flip", "color") == "color_flip"
    assert counterpart_variant("color_flip", "flip") == "color"
    assert counterpart_variant("none", "color_flip") == "color_flip"
    # a target image mirrored by the weak augmentation shows every object mirrored
    assert counterpart_variant("none", "exact", mirrored=True) == "flip"
    assert counterpart_variant("flip", "flip", mirrored=True) == "flip"
    with pytest.raises(VspaError, match="pairing_mode 'rotate' is unknown"):
        counterpart_variant("none", "rotate")


@pytest.mark.parametrize("mode", PAIRING_MODES)
@pytest.mark.parametrize("mirrored", [False, True])
def test_each_mode_returns_the_counterpart_it_promises(sets, table, mode, mirrored):
    """The returned annotation is the same object, in an appearance that differs from the target's (as the
    student sees it) in exactly the mode's attributes, at the place the table says."""
    targets, _ = _annotations(sets["target"])
    assert sorted(a["object_id"] for a in targets.values()) == table.object_ids
    by_object = {a["object_id"]: a for a in targets.values()}
    rows = table.counterpart(table.object_ids, mode, mirrored)
    opened = {}
    for row in rows:
        if row.split_dir not in opened:
            opened[row.split_dir] = _annotations(row.split_dir)[0]
        source = opened[row.split_dir][row.annotation_id]
        target = by_object[row.object_id]
        assert source["object_id"] == row.object_id and source["image_id"] == row.image_id
        assert source["category_id"] == target["category_id"] and source["bbox"] == target["bbox"]
        source_variant = source.get("augsim", {"variant": "none"})["variant"]
        assert source_variant == row.variant
        color, flip = VARIANT_FLAGS[target["augsim"]["variant"]]
        # the target's appearance as the student sees it (mirrored by the weak view or not)
        seen = {flags: name for name, flags in VARIANT_FLAGS.items()}[(color, flip != mirrored)]
        assert differing_attributes(seen, source_variant) == NAMED[mode]
        # the recorded attributes agree: colour differs iff the mode names it (for coloured objects)
        if "color" in target.get("attributes", {}) and len(set(target["attributes"]["color"])) > 1:
            assert (source["attributes"]["color"] != target["attributes"]["color"]) == ("color" in NAMED[mode])
    assert {row.variant for row in rows} <= set(VARIANTS)


def test_exact_counterparts_differ_from_the_target_only_by_fog(sets, table):
    _, images = _annotations(sets["target"])
    rows = table.counterpart(table.object_ids, "exact")
    for row in {(r.split_dir, r.image_id): r for r in rows}.values():
        _, source_images = _annotations(row.split_dir)
        record = source_images[row.image_id]
        clear = _read(row.split_dir / record["file_name"]).astype(np.float32) / 255.0
        depth = _read(row.split_dir / record["depth_file"]) * 0.01
        foggy = np.clip(apply_fog(clear, depth, BETA, AIRLIGHT) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        assert np.array_equal(foggy, _read(sets["target"] / images[row.image_id]["file_name"]))


def test_table_errors_name_the_set_and_the_fix(sets, tmp_path):
    with pytest.raises(VspaError, match=r"pairing/?.*color.*missing.*dvc repro augsim"):
        PairTable.build(sets["original"], tmp_path / "pairing", sets["target"])
    # a target with an object the original set does not have
    target = tmp_path / "target"
    shutil.copytree(sets["target"], target)
    data = json.loads((target / "annotations.json").read_text())
    data["annotations"][0]["object_id"] = 999_999_999
    (target / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(VspaError, match="object_id=999999999.*no counterpart"):
        PairTable.build(sets["original"], sets["variants"], target)
    # a variant set whose objects moved
    variants = tmp_path / "variants"
    shutil.copytree(sets["variants"], variants)
    data = json.loads((variants / "flip/annotations.json").read_text())
    data["annotations"][0]["object_id"] = 999_999_999
    (variants / "flip/annotations.json").write_text(json.dumps(data))
    with pytest.raises(VspaError, match="'flip' set does not hold the objects"):
        PairTable.build(sets["original"], variants, sets["target"])


def test_match_object_ids_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    ids = torch.tensor([7, 9])
    boxes = torch.tensor([[1.0, 0.0, 10.0, 10.0], [20.0, 25.0, 30.0, 40.0], [0.0, 0.0, 4.0, 10.0], [50.0, 50, 60, 60]])
    # IoUs: 0.9 with #7; 0.75 with #9; 0.4 with #7 (below 0.5); nothing
    assert match_object_ids(boxes, gt, ids).tolist() == [7, 9, -1, -1]
    assert match_object_ids(boxes, gt, ids, iou=0.3).tolist() == [7, 9, 7, -1]
    assert match_object_ids(boxes, gt[:0], ids[:0]).tolist() == [-1, -1, -1, -1]


def test_anchor_object_ids_scale_the_ground_truth_and_carry_the_mirror_flag():
    # image 0: 100x200 resized to 50x100 (x0.5); image 1: unchanged size, mirrored by the weak view
    targets = [
        {"boxes": torch.tensor([[20.0, 20.0, 60.0, 60.0]]), "object_ids": torch.tensor([4]), "flipped": False},
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "object_ids": torch.tensor([8]), "flipped": True},
    ]
    boxes = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [20.0, 20.0, 60.0, 60.0]]), torch.tensor([[0.0, 0.0, 10.0, 9.0]])]
    ids, mirrored = anchor_object_ids(boxes, targets, [(100, 200), (40, 40)], [(50, 100), (40, 40)])
    assert ids.tolist() == [4, -1, 8] and mirrored.tolist() == [False, False, True]


def test_pairing_bank_state_round_trip():
    bank = PairingBank("flip", np.array([3, 5]), torch.randn(2, 2, 4))
    again = PairingBank.from_state(bank.state_dict())
    assert again.mode == "flip" and torch.allclose(again.features, bank.features)
    assert torch.allclose(again.positives(torch.tensor([5]), True)[0], bank.features[1, 1:2])
    assert torch.allclose(bank.features.norm(dim=-1), torch.ones(2, 2))


TINY = dict(backbone="small", small_width=8, min_size=64, max_size=128, anchor_sizes=[16, 32, 64])


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_detector(detector_config(**TINY), 3).eval()


def _features_in(detector, folder: Path, object_ids: set[int]) -> dict[int, torch.Tensor]:
    """Embeddings of the given objects computed directly on one split (the independent reference)."""
    ds = DetectionDataset(folder / "annotations.json")
    out = {}
    for i in range(len(ds)):
        image, target = ds[i]
        rows = embed_batch(detector, [image], [target])["fg"]
        for oid, feat in zip(rows["object_ids"], rows["features"]):
            if int(oid) in object_ids:
                out[int(oid)] = torch.nn.functional.normalize(torch.as_tensor(feat), dim=0)
    return out


def test_pairing_bank_holds_the_counterparts_features(sets, table, detector):
    torch.set_num_threads(1)
    detector.train()
    bank = PairingBank.extract(detector, table, "exact", progress=False)
    assert detector.training  # mode restored
    detector.eval()
    ids = set(table.object_ids)
    # exact, target image as is: the object exactly as AugSim shows it
    reference = _features_in(detector, sets["augsim"], ids)
    got, found = bank.positives(torch.tensor(sorted(ids)), False)
    assert found.all()
    expected = torch.stack([reference[o] for o in sorted(ids)])
    assert torch.allclose(got, expected, atol=1e-5)
    # exact, target image mirrored: the mirrored version of what AugSim shows
    variant_of = table.target_variant
    mirrored_rows = table.counterpart(sorted(ids), "exact", True)
    for row in mirrored_rows:
        assert VARIANT_FLAGS[row.variant][1] != VARIANT_FLAGS[variant_of[row.object_id]][1]
    oid = mirrored_rows[0].object_id
    ref = _features_in(detector, mirrored_rows[0].split_dir, {oid})[oid]
    got, _ = bank.positives(torch.tensor([oid]), torch.tensor([True]))
    assert torch.allclose(got[0], ref, atol=1e-5)
    assert not torch.allclose(got[0], reference[oid], atol=1e-3)
    # unknown ids are reported as not found
    _, found = bank.positives(torch.tensor([-1, 123456789]), False)
    assert not found.any()


def test_pairing_triplets_use_the_counterpart_and_drop_unmatched(table, detector):
    rng = np.random.default_rng(0)
    object_ids = np.asarray(table.object_ids)
    features = torch.as_tensor(rng.normal(size=(2, len(object_ids), 16)), dtype=torch.float32)
    bank = PairingBank("color", object_ids, features)
    memory = MemoryBank(
        fg_features=rng.normal(size=(6, 16)).astype(np.float32),
        fg_labels=np.array([1, 1, 2, 2, 3, 3]),
        fg_image_ids=np.arange(6),
        fg_object_ids=np.arange(6),
        fg_boxes=np.zeros((6, 4), np.float32),
        bg_features=rng.normal(size=(2, 16)).astype(np.float32),
        bg_image_ids=np.arange(2),
        attrs={"class_names": ["car", "person", "truck"]},
    )
    anchors = torch.randn(3, 16, requires_grad=True)
    ids = torch.tensor([int(object_ids[1]), -1, int(object_ids[0])])
    triplets = pairing_triplets(
        bank,
        Retriever(memory),
        anchors,
        torch.tensor([1, 2, 3]),
        ids,
        torch.tensor([True, False, False]),
        torch.Generator().manual_seed(0),
    )
    assert len(triplets.anchor) == 2
    assert torch.equal(triplets.positive[0], bank.features[1, 1])  # object 1 seen mirrored
    assert torch.equal(triplets.positive[1], bank.features[0, 0])
    loss = triplets.loss(margin=1.5)
    loss.backward()
    assert anchors.grad[0].abs().sum() > 0 and anchors.grad[1].abs().sum() == 0
