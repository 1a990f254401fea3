"""COCO-style annotations: validation errors, the detection dataset, writing, hashing, the COCO import."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vspa.data import SPLITS
from vspa.data.prepare import prepare
from vspa.data.coco import DetectionDataset, atomic_dir, collate_fn, dataset_sha256, load_coco, write_coco
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]
W, H = 40, 30


def _valid() -> dict:
    return {
        "info": {"name": "tiny"},
        "categories": [{"id": 3, "name": "person"}, {"id": 1, "name": "car"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "sub/b.png", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "object_id": 5},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30.5, 0, 10, 5]},  # sticks out 0.5 px
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 20, 30], "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [5, 5, 5, 5], "object_id": 7},
        ],
    }


def _write(folder: Path, data: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("a.png", 60), ("sub/b.png", 200)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), value, np.uint8)).save(folder / name)
    path = folder / "ann.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_valid_file_loads_with_contiguous_labels_and_crowd_kept(tmp_path):
    coco = load_coco(_write(tmp_path, _valid()))
    assert coco.categories == ["car", "person"]  # sorted by category id
    assert coco.cat_id_to_label == {1: 1, 3: 2} and coco.label_to_cat_id == {1: 1, 2: 3}
    assert [img["id"] for img in coco.images] == [1, 2]
    assert [a["id"] for a in coco.annotations_by_image[2]] == [12, 13]
    assert coco.root == tmp_path and coco.num_annotations == 4


def _mutate_image(key, value, index=1):
    def mutate(d):
        d["images"][index][key] = value

    return mutate


def _mutate_ann(key, value, index=3):
    def mutate(d):
        d["annotations"][index][key] = value

    return mutate


BAD_CASES = {
    # name: (mutation of the valid dict | raw text | file action, substrings expected besides the file name)
    "malformed json": ('{"images": [', ["not valid JSON", "line 1"]),
    "missing key": (lambda d: d.pop("annotations"), ["'annotations'"]),
    "image without width": (lambda d: d["images"][0].pop("width"), ["image id=1", "a.png", "width"]),
    "missing image file": ("delete", ["image id=2", "sub/b.png", "not found"]),
    "unreadable image": ("garbage", ["image id=2", "sub/b.png", "cannot be read"]),
    "image size mismatch": (_mutate_image("width", 41), ["image id=2", "sub/b.png", "40x30", "41x30"]),
    "zero-width box": (_mutate_ann("bbox", [5, 5, 0, 5]), ["annotation id=13", "sub/b.png", "non-positive"]),
    "negative-height box": (_mutate_ann("bbox", [5, 5, 3, -2]), ["annotation id=13", "non-positive"]),
    "box outside image": (_mutate_ann("bbox", [35, 5, 7, 5]), ["annotation id=13", "sub/b.png", "outside"]),
    "box left of image": (_mutate_ann("bbox", [-2, 5, 7, 5]), ["annotation id=13", "outside"]),
    "box not numbers": (_mutate_ann("bbox", [5, 5, "x", 5]), ["annotation id=13", "[x, y, width, height]"]),
    "unknown category": (_mutate_ann("category_id", 7), ["annotation id=13", "unknown category_id=7"]),
    "duplicate image id": (_mutate_image("id", 1), ["image id=1", "duplicate image id"]),
    "duplicate annotation id": (_mutate_ann("id", 10), ["annotation id=10", "duplicate annotation id"]),
    "annotation of a missing image": (_mutate_ann("image_id", 99), ["annotation id=13", "image_id=99"]),
    "bad iscrowd": (_mutate_ann("iscrowd", 2), ["annotation id=13", "iscrowd"]),
    "duplicate category": (lambda d: d["categories"].append({"id": 1, "name": "bus"}), ["category id=1"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_each_bad_input_is_a_vspa_error_naming_file_and_item(tmp_path, name):
    change, needles = BAD_CASES[name]
    data = _valid()
    if callable(change):
        change(data)
    path = _write(tmp_path, change if isinstance(change, str) and change.startswith("{") else data)
    if change == "delete":
        (tmp_path / "sub/b.png").unlink()
    elif change == "garbage":
        (tmp_path / "sub/b.png").write_bytes(b"not a png at all")
    with pytest.raises(VspaError) as err:
        load_coco(path)
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_all_problems_are_reported_together(tmp_path):
    data = _valid()
    data["annotations"][0]["category_id"] = 8
    data["annotations"][3]["bbox"] = [1, 1, 0, 1]
    with pytest.raises(VspaError, match=r"2 problem\(s\)") as err:
        load_coco(_write(tmp_path, data))
    assert "annotation id=10" in str(err.value) and "annotation id=13" in str(err.value)


def test_missing_file_and_image_folder(tmp_path):
    with pytest.raises(VspaError, match="not found"):
        load_coco(tmp_path / "nope.json")
    path = _write(tmp_path, _valid())
    with pytest.raises(VspaError, match="image folder"):
        load_coco(path, image_root=tmp_path / "elsewhere")
    assert load_coco(path, image_root=tmp_path / "elsewhere", check_images=False).root == tmp_path / "elsewhere"


def test_image_root_in_the_file_is_relative_to_the_json(tmp_path):
    _write(tmp_path / "imgs", _valid())
    data = _valid()
    data["image_root"] = "../imgs"
    json_path = tmp_path / "ann" / "x.json"
    json_path.parent.mkdir()
    json_path.write_text(json.dumps(data))
    coco = load_coco(json_path)
    assert coco.image_path(coco.images[1]).resolve() == (tmp_path / "imgs/sub/b.png").resolve()


def test_dataset_targets_exclude_crowd_and_clip_boxes(tmp_path):
    ds = DetectionDataset(_write(tmp_path, _valid()))
    assert len(ds) == 2 and ds.num_classes == 2 and ds.class_names == ["car", "person"]
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 60 / 255))
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 11.0], [30.5, 0.0, 40.0, 5.0]]))
    assert target["labels"].tolist() == [1, 2] and target["labels"].dtype == torch.int64
    assert target["object_ids"].tolist() == [5, -1]
    assert target["image_id"] == 1 and target["index"] == 0
    assert target["ignore_boxes"].shape == (0, 4)
    _, target = ds[1]
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 5.0, 10.0, 10.0]]))  # the crowd box is not a target
    assert torch.equal(target["ignore_boxes"], torch.tensor([[0.0, 0.0, 20.0, 30.0]]))
    assert target["ignore_labels"].tolist() == [2]
    images, targets = collate_fn([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == 2


def test_dataset_transform_is_applied(tmp_path):
    def transform(image, target):
        return image * 0, {**target, "seen": True}

    image, target = DetectionDataset(_write(tmp_path, _valid()), transform=transform)[0]
    assert image.abs().sum() == 0 and target["seen"]


def test_dataset_on_the_synthetic_benchmark(tiny_benchmark):
    folder = Path(tiny_benchmark) / "source_train"
    data = json.loads((folder / "annotations.json").read_text())
    ds = DetectionDataset(folder / "annotations.json")
    assert ds.class_names == ["car", "person", "truck"]
    for i in range(len(ds)):
        image, target = ds[i]
        img = data["images"][i]
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert image.shape == (3, img["height"], img["width"]) and 0 <= image.min() and image.max() <= 1
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["boxes"].tolist() == expected
        assert target["object_ids"].tolist() == [a["object_id"] for a in anns]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]


def test_write_coco_round_trip_and_hash(tmp_path):
    data = _valid()
    _write(tmp_path, "{}")
    out = tmp_path / "out" / "annotations.json"
    write_coco(out, data["images"], data["annotations"], data["categories"], {"k": 1}, image_root="..")
    written = json.loads(out.read_text())
    assert list(written) == ["info", "image_root", "categories", "images", "annotations"]
    assert written["image_root"] == ".." and written["annotations"] == data["annotations"]
    assert [p.name for p in out.parent.iterdir()] == ["annotations.json"]  # no temporary file left
    assert load_coco(out).num_annotations == 4
    digest = dataset_sha256(out)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    write_coco(out, data["images"], data["annotations"][:1], data["categories"], {"k": 1}, image_root="..")
    assert dataset_sha256(out) != digest
    with pytest.raises(VspaError, match="not found"):
        dataset_sha256(tmp_path / "missing.json")


def test_atomic_dir_replaces_on_success_and_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "bench"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["bench"] and (target / "old.txt").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bench"]


# --------------------------------------------------------------------------- the prepare stage, source: coco


def _coco_params(tmp_path: Path, splits: dict[str, Path]) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["source"] = "coco"
    params["prepare"]["coco"] = {s: {"json": str(p), "images": str(p.parent)} for s, p in splits.items()}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_prepare_imports_coco_splits_without_copying_images(tmp_path):
    json_path = _write(tmp_path / "external", _valid())
    out, summary_path = tmp_path / "data" / "benchmark", tmp_path / "summary.json"
    summary = prepare(_coco_params(tmp_path, {s: json_path for s in SPLITS}), out, summary_path, 1, False)
    assert summary["splits"]["source_train"] == {
        "images": 2,
        "objects": 3,
        "per_class": {"car": 2, "person": 1},
        "crowd_regions": 1,
    }
    object_ids = []
    for split in SPLITS:
        written = json.loads((out / split / "annotations.json").read_text())
        assert written["image_root"] == "../../../external"  # relative to the split folder
        assert not (out / split / "images").exists()
        coco = load_coco(out / split / "annotations.json")
        assert coco.image_path(coco.images[1]).resolve() == (tmp_path / "external/sub/b.png").resolve()
        assert written["info"]["source_sha256"] == dataset_sha256(json_path)
        object_ids += [a["object_id"] for a in written["annotations"]]
    assert len(set(object_ids)) == len(object_ids)


def test_prepare_validates_every_split_before_writing(tmp_path):
    good = _write(tmp_path / "good", _valid())
    bad_data = _valid()
    bad_data["annotations"][2]["category_id"] = 42
    bad = _write(tmp_path / "bad", bad_data)
    out = tmp_path / "data" / "benchmark"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("previous dataset")
    params = _coco_params(tmp_path, {**{s: good for s in SPLITS}, "target_test": bad})
    with pytest.raises(VspaError, match="annotation id=12"):
        prepare(params, out, tmp_path / "summary.json", 1, False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["benchmark"]
    assert not (tmp_path / "summary.json").exists()

    missing = _coco_params(tmp_path, {s: good for s in SPLITS})
    params = yaml.safe_load(Path(missing).read_text())
    params["prepare"]["coco"]["source_test"]["json"] = None
    Path(missing).write_text(yaml.safe_dump(params))
    with pytest.raises(VspaError, match=r"prepare\.coco\.source_test"):
        prepare(missing, out, tmp_path / "summary.json", 1, False)


def test_image_cache_returns_the_same_images_and_keeps_to_its_budget(tiny_benchmark):
    ann = Path(tiny_benchmark) / "source_train" / "annotations.json"
    plain, cached = DetectionDataset(ann), DetectionDataset(ann, cache_mb=1024)
    for i in range(len(plain)):
        first = cached[i][0]
        first.mul_(0)  # a caller writing into its image must not change the cached copy
        assert torch.equal(cached[i][0], plain[i][0])
    assert len(cached._cache) == len(plain)
    one_image = plain[0][0].numel()  # bytes of one decoded uint8 image
    small = DetectionDataset(ann, cache_mb=1.5 * one_image / 2**20)
    for i in range(len(small)):
        assert torch.equal(small[i][0], plain[i][0])
    assert len(small._cache) == 1  # room for one image only: the others are read from disk every time
