"""Dataset importers on tiny fixtures written by the tests: VOC layout (VOC, Comic2k, Sim10k), Cityscapes /
Foggy Cityscapes instance-id maps, KITTI label files; the scenario builder, the presets and the weights check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vspa.config import compose, effective_params
from vspa.data.coco import DetectionDataset, load_coco
from vspa.data.importers import (
    IMPORTERS,
    import_comic2k,
    import_cityscapes,
    import_foggy_cityscapes,
    import_kitti,
    import_sim10k,
    import_voc,
    prepare_scenario,
    read_foggy_cityscapes,
    read_cityscapes,
    read_voc,
    require_pretrained,
)
from vspa.data.importers.voc import COMIC2K_CLASSES, VOC_CLASSES
from vspa.utils import VspaError

REAL_SCENARIOS = ("cityscapes_foggy", "sim10k_cityscapes", "voc_comic2k")


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


def _load(out_dir: Path) -> dict:
    return json.loads((out_dir / "annotations.json").read_text())


def _anns_of(data: dict, file_suffix: str) -> list[dict]:
    (image,) = [im for im in data["images"] if im["file_name"].endswith(file_suffix)]
    return [a for a in data["annotations"] if a["image_id"] == image["id"]]


# --------------------------------------------------------------------------- VOC layout fixtures

VOC_OBJECTS = {
    # id: (width, height, [(name, xmin, ymin, xmax, ymax, difficult)])
    "000001": (40, 30, [("car", 5, 6, 14, 20, 0), ("person", 1, 1, 40, 30, 1), ("cow", 2, 2, 8, 8, 0)]),
    "000002": (40, 30, [("cow", 3, 3, 9, 9, 0)]),
    "000003": (40, 30, [("car", 30, 10, 45, 35, 0), ("motorbike", 2, 2, 6, 6, 0), ("car", 50, 2, 60, 9, 0)]),
}


def _voc_xml(width: int, height: int, objects) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def make_voc(root: Path, objects=VOC_OBJECTS, lists=None) -> Path:
    lists = {"trainval": list(objects)} if lists is None else lists
    (root / "Annotations").mkdir(parents=True)
    for image_id, (w, h, objs) in objects.items():
        _image(root / "JPEGImages" / f"{image_id}.jpg", w, h)
        (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(w, h, objs))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, ids in lists.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_boxes_classes_difficult_and_clipping(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit" / "VOC2007")
    summary = import_voc(root, "trainval", tmp_path / "out")
    data = _load(tmp_path / "out")
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)
    cat = {c["name"]: c["id"] for c in data["categories"]}
    assert data["image_root"] == str(root / "JPEGImages")
    assert [im["file_name"] for im in data["images"]] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert data["info"]["dataset"] == "voc" and data["info"]["dataset_split"] == "trainval"
    first = _anns_of(data, "000001.jpg")
    # VOC corners are 1-based and inclusive: xmin 5..xmax 14 -> x 4, w 10
    assert [(a["category_id"], a["bbox"], a["iscrowd"]) for a in first] == [
        (cat["car"], [4.0, 5.0, 10.0, 15.0], 0),
        (cat["person"], [0.0, 0.0, 40.0, 30.0], 1),  # difficult -> iscrowd, ignored in evaluation
        (cat["cow"], [1.0, 1.0, 7.0, 7.0], 0),
    ]
    third = _anns_of(data, "000003.jpg")
    # (30,10)-(45,35) clipped to the 40x30 image; (50,2)-(60,9) lies outside it and is dropped
    assert [(a["bbox"], a["area"]) for a in third if a["category_id"] == cat["car"]] == [
        ([29.0, 9.0, 11.0, 21.0], 231.0)
    ]
    assert summary["stats"] == {"clipped_boxes": 1, "dropped_degenerate": 1}
    assert [a["id"] for a in data["annotations"]] == [a["object_id"] for a in data["annotations"]] == list(range(6))
    assert (summary["images"], summary["objects"], summary["crowd_regions"]) == (3, 5, 1)
    assert summary["per_class"]["car"] == 2 and summary["per_class"]["cow"] == 2


def test_voc_output_passes_the_loader_and_difficult_objects_become_ignore_boxes(tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    import_voc(root, "trainval", tmp_path / "out", classes=["car", "person"])
    coco = load_coco(tmp_path / "out" / "annotations.json")  # checks every image file and size
    assert coco.categories == ["car", "person"] and len(coco.images) == 3
    ds = DetectionDataset(tmp_path / "out" / "annotations.json")
    _, target = ds[0]
    assert target["boxes"].tolist() == [[4.0, 5.0, 14.0, 20.0]] and target["labels"].tolist() == [1]
    assert target["ignore_boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]] and target["ignore_labels"].tolist() == [2]


def test_voc_to_comic2k_keeps_the_six_classes_and_drop_empty_removes_images(tmp_path):
    root = make_voc(tmp_path / "VOC2007")
    part = read_voc(root, "trainval", classes=COMIC2K_CLASSES)
    assert part.stats["dropped_out_of_class"] == 3  # two cows, one motorbike
    summary = import_voc(root, "trainval", tmp_path / "out", classes=list(COMIC2K_CLASSES), drop_empty=True)
    data = _load(tmp_path / "out")
    assert [c["name"] for c in data["categories"]] == list(COMIC2K_CLASSES)
    assert [im["file_name"] for im in data["images"]] == ["000001.jpg", "000003.jpg"]  # 000002: only a cow
    assert summary["stats"]["dropped_empty_images"] == 1
    with pytest.raises(VspaError, match=r"unknown class name\(s\) motorcycle.*voc has: aeroplane"):
        read_voc(root, "trainval", classes=["car", "motorcycle"])


def test_comic2k_and_sim10k_defaults(tmp_path):
    comic = make_voc(
        tmp_path / "comic",
        {"a1": (20, 20, [("dog", 1, 1, 10, 10, 0), ("cow", 1, 1, 5, 5, 0)])},
        lists={"train": ["a1"], "test": []},
    )
    import_comic2k(comic, "train", tmp_path / "c")
    data = _load(tmp_path / "c")
    assert [c["name"] for c in data["categories"]] == list(COMIC2K_CLASSES)
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [(5, [0.0, 0.0, 10.0, 10.0])]
    with pytest.raises(VspaError, match=r"ImageSets/Main/test.txt: the split list is empty"):
        import_comic2k(comic, "test", tmp_path / "c2")

    sim = make_voc(tmp_path / "Sim10k", lists={})  # no split list: split 'all' reads every XML
    import_sim10k(sim, "all", tmp_path / "s")
    data = _load(tmp_path / "s")
    assert [c["name"] for c in data["categories"]] == ["car"]
    assert sorted(a["bbox"] for a in data["annotations"]) == [[4.0, 5.0, 10.0, 15.0], [29.0, 9.0, 11.0, 21.0]]


def test_voc_layout_errors_name_the_missing_piece_and_print_the_tree(tmp_path):
    root = make_voc(tmp_path / "Sim10k" / "VOC2012")
    with pytest.raises(VspaError) as err:
        import_sim10k(tmp_path / "Sim10k", "trainval", tmp_path / "o")
    msg = str(err.value)
    assert "missing folder 'Annotations/'" in msg and "Expected layout:" in msg
    assert "JPEGImages/<id>.jpg" in msg and "ImageSets/Main/trainval.txt" in msg
    assert f"Did you mean {root}?" in msg and "Found in" in msg and "VOC2012/" in msg

    with pytest.raises(
        VspaError,
        match=r"missing split list 'ImageSets/Main/trainval10k.txt' \(split lists found: "
        r"trainval\)(.|\n)*split: all",
    ):
        import_sim10k(root, "trainval10k", tmp_path / "o")

    (root / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(VspaError, match=r"missing image\(s\): JPEGImages/000002.jpg"):
        import_sim10k(root, "trainval", tmp_path / "o")
    (root / "Annotations" / "000003.xml").unlink()
    with pytest.raises(VspaError, match=r"missing annotation file\(s\): Annotations/000003.xml"):
        import_sim10k(root, "trainval", tmp_path / "o")
    with pytest.raises(VspaError, match=r"the dataset folder does not exist"):
        import_voc(tmp_path / "nowhere", "trainval", tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_voc_bad_xml_and_size_mismatch_and_unknown_option(tmp_path):
    root = make_voc(tmp_path / "VOC2007", {"x": (40, 30, [("car", 1, 1, 5, 5, 0)])})
    (root / "Annotations" / "x.xml").write_text(_voc_xml(41, 30, [("car", 1, 1, 5, 5, 0)]))
    with pytest.raises(VspaError, match=r"x.xml: <size> says 41x30 but the image .*x.jpg is 40x30"):
        read_voc(root, "trainval")
    (root / "Annotations" / "x.xml").write_text("<annotation><object><name>car</name></object></annotation>")
    with pytest.raises(VspaError, match=r"x.xml: object 0 \('car'\) has no valid <bndbox>"):
        read_voc(root, "trainval")
    (root / "Annotations" / "x.xml").write_text("<annotation>")
    with pytest.raises(VspaError, match=r"x.xml: not valid XML"):
        read_voc(root, "trainval")
    with pytest.raises(VspaError, match=r"voc importer: unknown option\(s\) beta"):
        import_voc(root, "trainval", tmp_path / "o", beta=0.02)


# --------------------------------------------------------------------------- Cityscapes fixtures

STEM = "aachen_000000_000019"


def _instance_map() -> np.ndarray:
    ids = np.full((32, 64), 7, dtype=np.uint16)  # road (stuff)
    ids[2:6, 3:11] = 26000  # car: rows 2..5, cols 3..10
    ids[10:12, 20:22] = 26001  # a car split by an occluder into two parts
    ids[14:16, 30:32] = 26001
    ids[20, 40] = 24000  # a one-pixel person
    ids[25:30, 0:8] = 26  # crowd of cars (no instance id): ignored
    ids[25:30, 50:60] = 29000  # caravan: not one of the 8 classes
    ids[0:2, 50:52] = 25003  # rider
    return ids


def make_cityscapes(root: Path, split: str = "train", betas=("0.005", "0.01", "0.02"), clear: bool = True) -> Path:
    gt = root / "gtFine" / split / "aachen" / f"{STEM}_gtFine_instanceIds.png"
    gt.parent.mkdir(parents=True)
    Image.fromarray(_instance_map()).save(gt)
    if clear:
        _image(root / "leftImg8bit" / split / "aachen" / f"{STEM}_leftImg8bit.png", 64, 32)
    for beta in betas:
        _image(root / "leftImg8bit_foggy" / split / "aachen" / f"{STEM}_leftImg8bit_foggy_beta_{beta}.png", 64, 32)
    return root


def test_cityscapes_boxes_from_instance_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    summary = import_cityscapes(root, "train", tmp_path / "out")
    data = _load(tmp_path / "out")
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert list(names.values()) == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert data["images"] == [{"id": 0, "file_name": f"{STEM}_leftImg8bit.png", "width": 64, "height": 32}]
    assert data["image_root"] == str(root / "leftImg8bit" / "train" / "aachen")
    # sorted by instance id: 24000, 25003, 26000, 26001
    assert [(names[a["category_id"]], a["bbox"]) for a in data["annotations"]] == [
        ("person", [40.0, 20.0, 1.0, 1.0]),
        ("rider", [50.0, 0.0, 2.0, 2.0]),
        ("car", [3.0, 2.0, 8.0, 4.0]),
        ("car", [20.0, 10.0, 12.0, 6.0]),
    ]
    assert summary["stats"] == {"dropped_crowd": 1, "dropped_out_of_class": 1}  # crowd region, caravan
    import_cityscapes(root, "train", tmp_path / "car", classes=["car"])
    car_only = _load(tmp_path / "car")
    assert [a["bbox"] for a in car_only["annotations"]] == [[3.0, 2.0, 8.0, 4.0], [20.0, 10.0, 12.0, 6.0]]


def test_foggy_cityscapes_beta_levels(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    import_foggy_cityscapes(root, "train", tmp_path / "f")
    data = _load(tmp_path / "f")
    assert [im["file_name"] for im in data["images"]] == [f"{STEM}_leftImg8bit_foggy_beta_0.02.png"]
    assert len(data["annotations"]) == 4
    every = read_foggy_cityscapes(root, "train", beta="all")
    assert sorted(r.path.name for r in every.images) == [
        f"{STEM}_leftImg8bit_foggy_beta_{b}.png" for b in ("0.005", "0.01", "0.02")
    ]
    assert sorted(r.attrs["fog_beta"] for r in every.images) == [0.005, 0.01, 0.02]  # -> the COCO image entries
    assert data["images"][0]["fog_beta"] == 0.02
    assert all(r.attrs == {} for r in read_cityscapes(root, "train").images)  # clear images: no field
    assert all(len(r.objects) == 4 for r in every.images)
    two = read_foggy_cityscapes(root, "train", beta=[0.01, "0.02"])
    assert len(two.images) == 2
    with pytest.raises(VspaError, match=r"beta = 0.03 is not a released fog level"):
        read_foggy_cityscapes(root, "train", beta=0.03)


def test_cityscapes_layout_errors(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes", betas=("0.02",))
    with pytest.raises(
        VspaError,
        match=r"no image named \*_leftImg8bit_foggy_beta_0.005.png, \*_leftImg8bit_foggy_"
        r"beta_0.01.png in 'leftImg8bit_foggy/train/<city>/'(.|\n)*Expected layout"
        r"(.|\n)*Only beta 0.02 is there",
    ):
        read_foggy_cityscapes(root, "train", beta="all")
    with pytest.raises(VspaError, match=r"missing folder 'leftImg8bit/val/'(.|\n)*gtFine/val/<city>/"):
        import_cityscapes(root, "val", tmp_path / "o")
    with pytest.raises(VspaError, match=r"split 'test' has no public instance labels"):
        import_cityscapes(root, "test", tmp_path / "o")
    with pytest.raises(VspaError, match=r"unknown class name\(s\) motorbike"):
        import_cityscapes(root, "train", tmp_path / "o", classes=["car", "motorbike"])
    (root / "gtFine" / "train" / "aachen" / f"{STEM}_gtFine_instanceIds.png").unlink()
    with pytest.raises(
        VspaError, match=rf"missing instance-id map\(s\): gtFine/train/aachen/{STEM}_gtFine_instanceIds"
    ):
        import_cityscapes(root, "train", tmp_path / "o")
    (root / "gtFine" / "train").rename(root / "gtFine" / "training")
    with pytest.raises(VspaError, match=r"missing folder 'gtFine/train/'(.|\n)*Found in .*: gtFine/, leftImg8bit/"):
        import_cityscapes(root, "train", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cityscapes_image_and_map_sizes_must_agree(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes", betas=())
    _image(root / "leftImg8bit" / "train" / "aachen" / f"{STEM}_leftImg8bit.png", 60, 32)
    with pytest.raises(VspaError, match=r"the image is 60x32 but its instance map .* is 64x32"):
        import_cityscapes(root, "train", tmp_path / "o")


# --------------------------------------------------------------------------- KITTI fixtures

KITTI_LINES = [
    "Car 0.00 0 -1.57 10.50 5.00 30.25 20.00 1.50 1.60 3.90 1.00 1.50 10.00 -1.50",
    "DontCare -1 -1 -10 0.00 0.00 5.00 5.00 -1 -1 -1 -1000 -1000 -1000 -10",
    "Pedestrian 0.00 0 0.20 2.00 2.00 6.00 12.00 1.70 0.60 0.80 2.00 1.50 8.00 0.10",
    "Van 0.10 1 1.00 40.00 30.00 60.00 45.00 2.00 1.80 4.50 -3.00 1.50 20.00 1.10",
]


def make_kitti(root: Path) -> Path:
    _image(root / "training" / "image_2" / "000000.png", 50, 40)
    _image(root / "training" / "image_2" / "000001.png", 50, 40)
    (root / "training" / "label_2").mkdir(parents=True)
    (root / "training" / "label_2" / "000000.txt").write_text("\n".join(KITTI_LINES) + "\n")
    (root / "training" / "label_2" / "000001.txt").write_text("")
    return root


def test_kitti_car_only_dontcare_dropped_and_class_map(tmp_path):
    root = make_kitti(tmp_path / "kitti")
    summary = import_kitti(root, "train", tmp_path / "out")
    data = _load(tmp_path / "out")
    assert data["categories"] == [{"id": 1, "name": "car"}]
    assert [a["bbox"] for a in data["annotations"]] == [[10.5, 5.0, 19.75, 15.0]]
    assert summary["stats"] == {"dropped_dontcare": 1, "dropped_out_of_class": 2}
    assert summary["images"] == 2  # an image without objects stays unless drop_empty
    mapped = import_kitti(
        root,
        "train",
        tmp_path / "m",
        class_map={"Car": "car", "Van": "car", "Pedestrian": "person"},
        classes=["car", "person"],
        drop_empty=True,
    )
    data = _load(tmp_path / "m")
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [
        (1, [10.5, 5.0, 19.75, 15.0]),
        (2, [2.0, 2.0, 4.0, 10.0]),
        (1, [40.0, 30.0, 10.0, 10.0]),  # Van clipped
    ]
    assert mapped["images"] == 1 and mapped["stats"]["clipped_boxes"] == 1


def test_kitti_errors(tmp_path):
    root = make_kitti(tmp_path / "kitti")
    with pytest.raises(VspaError, match=r"unknown KITTI type\(s\) Bus"):
        import_kitti(root, "train", tmp_path / "o", class_map={"Bus": "car"})
    with pytest.raises(VspaError, match=r"no KITTI type maps to person"):
        import_kitti(root, "train", tmp_path / "o", classes=["car", "person"])
    with pytest.raises(VspaError, match=r"split 'testing' has no labels"):
        import_kitti(root, "testing", tmp_path / "o")
    (root / "training" / "label_2" / "000001.txt").write_text("Car 0 0 0 1\n")
    with pytest.raises(VspaError, match=r"000001.txt: line 1 has 5 fields"):
        import_kitti(root, "train", tmp_path / "o")
    (root / "training" / "image_2" / "000001.png").unlink()
    with pytest.raises(VspaError, match=r"missing image\(s\): training/image_2/000001.png"):
        import_kitti(root, "train", tmp_path / "o")
    (root / "training" / "label_2").rename(root / "training" / "labels")
    with pytest.raises(VspaError, match=r"missing folder 'training/label_2/'(.|\n)*training/label_2/<id>.txt"):
        import_kitti(root, "train", tmp_path / "o")


# --------------------------------------------------------------------------- scenarios


def _sim_cityscapes_cfg(**source_train) -> dict:
    return {
        "classes": ["car"],
        "seed": 0,
        "splits": {
            "source_train": {"importer": "sim10k", "dir": "Sim10k", "split": "all", **source_train},
            "source_test": {"importer": "sim10k", "dir": "Sim10k", "split": "all", "sample": 1},
            "target_train": {"importer": "cityscapes", "dir": "cityscapes", "split": "train"},
            "target_test": {"importer": "foggy_cityscapes", "dir": "cityscapes", "split": "val", "beta": "all"},
        },
    }


def _data_root(tmp_path: Path) -> Path:
    data_root = tmp_path / "datasets"
    make_voc(data_root / "Sim10k", lists={})
    make_cityscapes(data_root / "cityscapes", "train")
    make_cityscapes(data_root / "cityscapes", "val")
    return data_root


def test_prepare_scenario_builds_four_splits_with_a_held_out_sample(tmp_path):
    data_root = _data_root(tmp_path)
    out = tmp_path / "benchmark"
    summaries = prepare_scenario(
        _sim_cityscapes_cfg(exclude="source_test"), data_root, out, scenario="sim10k_cityscapes"
    )
    assert set(summaries) == {"source_train", "source_test", "target_train", "target_test"}
    splits = {name: json.loads((out / name / "annotations.json").read_text()) for name in summaries}
    assert all(d["categories"] == [{"id": 1, "name": "car"}] for d in splits.values())
    test_files = {im["file_name"] for im in splits["source_test"]["images"]}
    train_files = {im["file_name"] for im in splits["source_train"]["images"]}
    assert len(test_files) == 1 and len(train_files) == 2 and not test_files & train_files
    assert summaries["source_train"]["stats"]["excluded_held_out"] == 1
    info = splits["target_test"]["info"]
    assert (info["scenario"], info["domain"], info["split"], info["dataset"]) == (
        "sim10k_cityscapes",
        "target",
        "test",
        "foggy_cityscapes",
    )
    assert len(splits["target_test"]["images"]) == 3  # beta all: one image per fog level
    assert [a["bbox"] for a in splits["target_train"]["annotations"]] == [[3.0, 2.0, 8.0, 4.0], [20.0, 10.0, 12.0, 6.0]]
    # object ids are unique over the four splits (split code * 10_000_000 + annotation id), as the synthetic ones
    assert [a["object_id"] for a in splits["target_train"]["annotations"]] == [20_000_000, 20_000_001]
    for name in summaries:  # every split passes the loader's full check (files, sizes, boxes)
        assert len(load_coco(out / name / "annotations.json").images) == len(splits[name]["images"])

    prepare_scenario(_sim_cityscapes_cfg(exclude="source_test"), data_root, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "source_test" / "annotations.json").read_text())
    assert again["images"] == splits["source_test"]["images"]  # the same seeded sample


def test_prepare_scenario_copies_images_when_asked(tmp_path):
    data_root = _data_root(tmp_path)
    out = tmp_path / "benchmark"
    prepare_scenario({**_sim_cityscapes_cfg(), "copy_images": True}, data_root, out)
    data = json.loads((out / "target_train" / "annotations.json").read_text())
    assert data["image_root"] is None
    assert data["images"][0]["file_name"] == f"images/{STEM}_leftImg8bit.png"
    assert (out / "target_train" / "images" / f"{STEM}_leftImg8bit.png").is_file()
    assert len(load_coco(out / "target_train" / "annotations.json").images) == 1


def test_prepare_scenario_config_errors(tmp_path):
    data_root = _data_root(tmp_path)
    cfg = _sim_cityscapes_cfg()
    del cfg["splits"]["target_test"]
    with pytest.raises(VspaError, match=r"prepare.splits must define exactly source_train, source_test, target_train"):
        prepare_scenario(cfg, data_root, tmp_path / "o")
    with pytest.raises(VspaError, match=r"prepare.splits.source_train: unknown key\(s\) beta"):
        prepare_scenario(_sim_cityscapes_cfg(beta=0.02), data_root, tmp_path / "o")
    with pytest.raises(VspaError, match=r"source_train: unknown key\(s\) classes \(the label space is prepare.classes"):
        prepare_scenario(_sim_cityscapes_cfg(classes=["car"]), data_root, tmp_path / "o")
    with pytest.raises(VspaError, match=r"source_train.sample = 9 but the dataset split has only 3 images"):
        prepare_scenario(_sim_cityscapes_cfg(sample=9), data_root, tmp_path / "o")
    with pytest.raises(VspaError, match=r"source_train.exclude must name another split"):
        prepare_scenario(_sim_cityscapes_cfg(exclude="source_train"), data_root, tmp_path / "o")
    with pytest.raises(VspaError, match=r"source_train.importer = 'coco': choose one of sim10k"):
        prepare_scenario(_sim_cityscapes_cfg(importer="coco"), data_root, tmp_path / "o")
    with pytest.raises(VspaError, match=r"data.root = .*nowhere: folder not found"):
        prepare_scenario(_sim_cityscapes_cfg(), tmp_path / "nowhere", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("scenario", REAL_SCENARIOS)
def test_real_presets_select_importers_and_stop_at_the_missing_data(tmp_path, scenario):
    params = effective_params({"scenario": scenario})
    assert params["prepare"]["source"] == "import" and set(params["prepare"]["splits"]) == set(
        ["source_train", "source_test", "target_train", "target_test"]
    )
    assert all(spec["importer"] in IMPORTERS for spec in params["prepare"]["splits"].values())
    assert params["model"]["min_size"] == 600 and params["pretrain"]["batch_size"] == 4
    adapt = params["adapt"]
    assert (adapt["tau"], adapt["margin"], adapt["lambda_fg"], adapt["lambda_bg"], adapt["lambda_unsup"]) == (
        0.8,
        1.5,
        0.05,
        0.05,
        1.0,
    )
    (tmp_path / "datasets").mkdir()
    with pytest.raises(VspaError, match=r"the dataset folder does not exist(.|\n)*Expected layout"):
        prepare_scenario(params["prepare"], tmp_path / "datasets", tmp_path / "o", scenario=scenario)


def test_require_pretrained(tmp_path):
    sim = effective_params({"scenario": "sim10k_cityscapes"})["model"]
    with pytest.raises(
        VspaError,
        match=r"model.pretrained_weights is null(.|\n)*ResNet101_Weights.IMAGENET1K_V1"
        r"(.|\n)*-S model.pretrained_weights=",
    ):
        require_pretrained(sim, "sim10k_cityscapes")
    city = effective_params({"scenario": "cityscapes_foggy"})["model"]
    with pytest.raises(VspaError, match=r"r16.pth: no such file(.|\n)*VGG16_Weights.IMAGENET1K_V1"):
        require_pretrained({**city, "pretrained_weights": str(tmp_path / "r16.pth")}, "cityscapes_foggy")
    weights = tmp_path / "r101.pth"
    weights.write_bytes(b"x")
    assert require_pretrained({**sim, "pretrained_weights": str(weights)}, "sim10k_cityscapes") == weights
    assert require_pretrained(effective_params({"scenario": "synth_fog"})["model"], "synth_fog") is None


@pytest.mark.parametrize("section", ["pretrain", "oracle"])
def test_training_stage_of_a_real_preset_stops_without_weights(tmp_path, monkeypatch, section):
    """Before any work: the pretrain / oracle stage of a real-data preset without model.pretrained_weights
    stops with the file, the param, the README section and the opt-out; with the opt-out it trains."""
    import yaml

    from vspa.data.coco import write_coco
    from vspa.detection import train

    started = []

    def fake_train(*args, **kwargs):
        started.append(args)
        raise RuntimeError("training started")

    monkeypatch.setattr(train, "train_detector", fake_train)
    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["scenario=sim10k_cityscapes", f"{section}.device=cpu"]
    params = tmp_path / "my_params.yaml"
    params.write_text(yaml.safe_dump(compose(conf, overrides)))  # model.pretrained_weights: null, as composed
    data = tmp_path / "split"
    data.mkdir()
    write_coco(data / "annotations.json", [], [], [{"id": 1, "name": "car"}], {})
    args = (str(params), section, data, tmp_path / "model.pt", tmp_path / "log.csv", tmp_path / "work", "test")
    with pytest.raises(
        VspaError,
        match=r"my_params.yaml: scenario sim10k_cityscapes(.|\n)*pretrained_weights is null"
        r"(.|\n)*1. ImageNet weights(.|\n)*model.from_scratch=true",
    ):
        train.run_training_stage(*args)
    assert not started and not (tmp_path / "model.pt").exists()
    params.write_text(yaml.safe_dump(compose(conf, [*overrides, "model.from_scratch=true", "model.backbone=small"])))
    with pytest.raises(RuntimeError, match="training started"):  # the explicit opt-out goes on to train
        train.run_training_stage(*args)


# --------------------------------------------------------------------------- real-size smoke fixtures


@pytest.mark.parametrize("scenario", REAL_SCENARIOS)
def test_smoke_fixture_has_the_real_layout_and_size_and_imports(tmp_path, scenario):
    """vspa.data.smoke writes what each preset's importers read, at the dataset's real image size."""
    import yaml

    from vspa.data.smoke import write_fixture

    root = write_fixture(scenario, tmp_path / "datasets")
    params = compose(Path(__file__).resolve().parents[1] / "conf", [f"scenario={scenario}"])
    params.update(data={"root": str(root)})
    if scenario == "sim10k_cityscapes":
        params["prepare"]["splits"]["source_test"]["sample"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parents[1] / "stages" / "prepare.py"),
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "bench"),
            "--summary",
            str(tmp_path / "summary.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())["splits"]
    assert all(summary[s]["images"] >= 2 and summary[s]["objects"] >= 2 for s in summary)
    sizes = {(im["width"], im["height"]) for s in summary for im in _load(tmp_path / "bench" / s)["images"]}
    expected = {
        "cityscapes_foggy": {(2048, 1024)},
        "sim10k_cityscapes": {(1914, 1052), (2048, 1024)},
        "voc_comic2k": {(500, 375), (640, 480)},
    }[scenario]
    assert sizes == expected
    if scenario == "cityscapes_foggy":  # foggy target: train at beta 0.02, test at all three levels, each tagged
        train = _load(tmp_path / "bench" / "target_train")["images"]
        assert all(im["file_name"].endswith("_foggy_beta_0.02.png") and im["fog_beta"] == 0.02 for im in train)
        target = _load(tmp_path / "bench" / "target_test")["images"]
        assert {im["fog_beta"] for im in target} == {0.005, 0.01, 0.02}
        assert all(im["file_name"].endswith(f"_foggy_beta_{im['fog_beta']}.png") for im in target)


def test_random_backbone_weights_load_as_pretrained_weights(tmp_path):
    from vspa.data.smoke import write_random_weights
    from vspa.detection.backbones import build_backbone

    path = write_random_weights("resnet50", tmp_path / "r50.pth")
    state = torch.load(path, weights_only=True)
    assert float(state["layer1.0.bn3.weight"].abs().sum()) == 0  # residual branches start at zero
    build_backbone("resnet50", str(path))  # accepted by the loader of model.pretrained_weights


def test_smoke_fixture_puts_every_class_in_every_split(tmp_path):
    """Subsample refuses a memory with an empty class: each split of a fixture holds every preset class."""
    from vspa.data.importers.cityscapes import read_cityscapes
    from vspa.data.smoke import write_fixture

    root = write_fixture("cityscapes_foggy", tmp_path)
    for split in ("train", "val"):
        labels = {o.category for r in read_cityscapes(root / "cityscapes", split).images for o in r.objects}
        assert len(labels) == 8, (split, labels)
