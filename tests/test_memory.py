"""Memory extraction, the HDF5 file (round trip, streaming, validation), inspection and the two stages."""

from __future__ import annotations

import json
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import detector_config

from vspa.detection.model import build_detector
from vspa.memory.extract import extract_memory
from vspa.memory.inspect import inspect_memory
from vspa.memory.store import FORMAT_VERSION, MemoryBank, memory_writer, open_memory, write_memory
from vspa.utils import VspaError
from loaders import stage_main

TINY = dict(backbone="small", small_width=8, min_size=64, max_size=128, anchor_sizes=[16, 32, 64])
CLASSES = ["car", "person"]


def tiny_detector(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(detector_config(**TINY), len(CLASSES)).eval()


class ListDataset(torch.utils.data.Dataset):
    """The DetectionDataset contract on a few in-memory images."""

    class_names = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, items, fail_at: int | None = None):
        self.items = items
        self.fail_at = fail_at

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("unreadable image")
        return self.items[i]


def make_items():
    """Three images of two sizes that both resize to 64x128 (scale 2 and 4/3) with 2, 1 and 0 objects."""
    g = torch.Generator().manual_seed(3)
    spec = [
        ((32, 64), [[4.0, 2.0, 20.0, 14.0], [30.0, 10.0, 60.0, 30.0]], [1, 2]),
        ((48, 96), [[10.0, 6.0, 40.0, 45.0]], [2]),
        ((32, 64), [], []),
    ]
    items = []
    for i, ((h, w), boxes, labels) in enumerate(spec):
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": 10 + i,
            "object_ids": torch.arange(100 * i, 100 * i + len(boxes), dtype=torch.int64),
            "index": i,
        }
        items.append((torch.rand(3, h, w, generator=g), target))
    return items


def random_bank(n=40, m=6, d=8, seed=0, index=False) -> MemoryBank:
    rng = np.random.default_rng(seed)
    bank = MemoryBank(
        fg_features=rng.normal(size=(n, d)).astype(np.float32),
        fg_labels=np.arange(n) % 2 + 1,
        fg_image_ids=np.arange(n) // 3,
        fg_object_ids=np.arange(n) + 1000,
        fg_boxes=rng.uniform(0, 50, size=(n, 4)).astype(np.float32),
        bg_features=rng.normal(size=(m, d)).astype(np.float32),
        bg_image_ids=np.arange(m),
        attrs={"class_names": CLASSES, "checkpoint_sha256": "c" * 64, "dataset_sha256": "d" * 64, "keep": "all"},
    )
    if index:
        bank.fg_index, bank.bg_index = np.arange(n) * 2, np.arange(m) * 3
    return bank


# --------------------------------------------------------------------------- the file


@pytest.mark.parametrize("index", [False, True])
def test_hdf5_round_trip(tmp_path, index):
    bank = random_bank(index=index)
    path = tmp_path / "m.h5"
    write_memory(path, bank, chunk_rows=7)  # several chunks
    got = open_memory(path, expected_dim=8)
    for name in (
        "fg_features",
        "fg_labels",
        "fg_image_ids",
        "fg_object_ids",
        "fg_boxes",
        "bg_features",
        "bg_image_ids",
    ):
        assert np.array_equal(getattr(got, name), getattr(bank, name)), name
    if index:
        assert np.array_equal(got.fg_index, bank.fg_index) and np.array_equal(got.bg_index, bank.bg_index)
    else:
        assert got.fg_index is None and got.bg_index is None
    assert got.class_names == CLASSES and got.attrs["keep"] == "all"
    assert got.attrs["feature_dim"] == 8 and got.attrs["format_version"] == FORMAT_VERSION
    assert got.attrs["checkpoint_sha256"] == "c" * 64
    with h5py.File(path) as f:  # streamed: resizable, chunked datasets
        assert f["fg/features"].maxshape == (None, 8) and f["fg/features"].chunks is not None
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]  # no temp file left


def test_writer_leaves_no_file_when_interrupted(tmp_path):
    path = tmp_path / "m.h5"
    with pytest.raises(RuntimeError):
        with memory_writer(path, 4, {"class_names": CLASSES}, chunk_rows=2) as w:
            w.append_bg(features=np.ones((3, 4)), image_ids=np.arange(3))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="column features"):
        with memory_writer(path, 4, {"class_names": CLASSES}) as w:
            w.append_bg(features=np.ones((3, 5)), image_ids=np.arange(3))
    assert list(tmp_path.iterdir()) == []


def test_missing_unreadable_and_truncated_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.h5"
    write_memory(good, random_bank())
    with pytest.raises(VspaError, match=r"missing\.h5: memory file not found.*dvc repro"):
        open_memory(tmp_path / "missing.h5")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(VspaError, match=r"text\.h5: not an HDF5 file"):
        open_memory(text)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VspaError, match=r"truncated\.h5: cannot read the HDF5 file, it is truncated"):
        open_memory(truncated)
    with pytest.raises(VspaError, match=r"good\.h5: feature dimension 8 does not match the detector's .* 1024"):
        open_memory(good, expected_dim=1024)


def _set_nan(f):
    f["fg/features"][3:5, 0] = np.nan


def _set_inf(f):
    f["bg/features"][2, 1] = np.inf


def _one_class_only(f):
    f["fg/labels"][:] = 1


def _unknown_label(f):
    f["fg/labels"][0] = 7


BAD_EDITS = {
    "nogroup": (lambda f: f.__delitem__("bg"), r"group 'bg' is missing"),
    "nodataset": (lambda f: f.__delitem__("fg/object_ids"), r"dataset 'fg/object_ids' is missing"),
    "wrongdim": (
        lambda f: f.attrs.create("feature_dim", 16),
        r"'fg/features' has feature dimension \(8,\), expected \(16,\)",
    ),
    "version": (lambda f: f.attrs.create("format_version", 99), r"format version 99 is not supported"),
    "nan": (_set_nan, r"fg/features has 2 row\(s\) with NaN or inf values \(rows 3, 4\)"),
    "inf": (_set_inf, r"bg/features has 1 row\(s\) .*\(rows 2\)"),
    "emptyclass": (_one_class_only, r"class\(es\) 'person' have no foreground entries"),
    "badlabel": (_unknown_label, r"1 foreground label\(s\) outside 1..2 \(first at row 0\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_EDITS))
def test_bad_contents_are_clear_errors_naming_the_file(tmp_path, name):
    edit, message = BAD_EDITS[name]
    path = tmp_path / f"{name}.h5"
    write_memory(path, random_bank())
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(VspaError, match=message) as info:
        open_memory(path)
    assert str(info.value).startswith(str(path))


def test_inspect_shows_counts_dims_norms_and_attributes(tmp_path):
    bank = random_bank(n=6, m=2)
    bank.fg_labels = np.array([1, 1, 1, 2, 2, 1])
    bank.fg_features[:] = 0
    bank.fg_features[:, 0] = [3, 3, 3, 1, 1, 3]  # car norms 3, person norms 1
    path = tmp_path / "m.h5"
    write_memory(path, bank)
    text = inspect_memory(path)
    lines = text.splitlines()
    car = next(line for line in lines if line.startswith("fg / car")).split()
    person = next(line for line in lines if line.startswith("fg / person")).split()
    assert car[3:6] == ["4", "2", "3.000"] and person[3:6] == ["2", "1", "1.000"]  # entries, images, norm mean
    assert "feature dim: 8" in text and "checkpoint_sha256" in text and "car, person" in text


# --------------------------------------------------------------------------- extraction on the real detector


def test_foreground_entry_equals_direct_pool_and_box_head(tmp_path):
    det = tiny_detector()
    items = make_items()
    path = tmp_path / "full.h5"
    stats = extract_memory(
        det, ListDataset(items), path, batch_size=2, chunk_rows=2, progress=False, attrs={"checkpoint_sha256": "x"}
    )
    assert (stats.images, stats.fg_rows, stats.bg_rows, stats.fg_dropped) == (3, 3, 3, 0)
    bank = open_memory(path, expected_dim=1024)
    assert bank.fg_image_ids.tolist() == [10, 10, 11] and bank.fg_object_ids.tolist() == [0, 1, 100]
    assert bank.fg_labels.tolist() == [1, 2, 2] and bank.bg_image_ids.tolist() == [10, 11, 12]
    assert np.array_equal(bank.fg_boxes, torch.cat([t["boxes"] for _, t in items]).numpy())  # original coords
    assert bank.attrs["keep"] == "all" and bank.attrs["checkpoint_sha256"] == "x"

    # Direct call, one image at a time, with the box scaled by hand to the resized image (64x128).
    with torch.no_grad():
        for row, (item, box_idx, scale) in enumerate([(0, 0, 2.0), (0, 1, 2.0), (1, 0, 4.0 / 3.0)]):
            image, target = items[item]
            image_list, _ = det.prepare([image])
            assert image_list.image_sizes == [(64, 128)]
            features = det.backbone_features(image_list)
            box = target["boxes"][box_idx : box_idx + 1] * scale
            direct = det.embed(det.pool(features, [box], image_list.image_sizes))[0]
            assert torch.allclose(torch.from_numpy(bank.fg_features[row]), direct, atol=1e-5), row
            if row == 2:  # the background entry of the same image: boxes masked, pooled, box head
                bg = det.embed(det.pool_background(features, [box], image_list.image_sizes))[0]
                assert torch.allclose(torch.from_numpy(bank.bg_features[1]), bg, atol=1e-5)


def test_background_entry_masks_exactly_the_box_cells_of_a_hand_made_map(tmp_path):
    det = tiny_detector()
    det.stride = 8  # the hand-made map below replaces the backbone's output and has stride 8
    c = det.feature_channels
    image = torch.rand(3, 32, 64)  # resized x2 to 64x128: an 8x16 map at stride 8
    box = [8.0, 4.0, 24.0, 20.0]  # resized: [16, 8, 48, 40] -> cell centres x 20..44 (cols 2-5), y 12..36 (rows 1-4)
    fmap = torch.arange(1, c + 1, dtype=torch.float32)[None, :, None, None].repeat(1, 1, 8, 16)
    crowd = [44.0, 20.0, 56.0, 28.0]  # resized: [88, 40, 112, 56] -> x centres 92..108 (cols 11-13), rows 5-6
    fmap[..., 1:5, 2:6] = 1000.0  # the box cells: must not leak into the background entry
    fmap[..., 5:7, 11:14] = -1000.0  # the crowd region's cells: not an entry, but not background either
    det.backbone_features = lambda image_list: OrderedDict([("0", fmap)])
    target = {
        "boxes": torch.tensor([box]),
        "labels": torch.tensor([1]),
        "image_id": 0,
        "object_ids": torch.tensor([5]),
        "ignore_boxes": torch.tensor([crowd]),
    }
    path = tmp_path / "m.h5"
    extract_memory(det, ListDataset([(image, target)]), path, progress=False)
    with h5py.File(path) as f:
        got = torch.from_numpy(f["bg/features"][0])
        assert f["fg/object_ids"][()].tolist() == [5]
    masked = fmap.clone()
    masked[..., 1:5, 2:6] = 0.0
    masked[..., 5:7, 11:14] = 0.0
    with torch.no_grad():
        expected = det.embed(F.adaptive_avg_pool2d(masked, 7))[0]
        unmasked = det.embed(F.adaptive_avg_pool2d(fmap, 7))[0]
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, unmasked, atol=1e-2)


def test_keep_correct_drops_misclassified_objects(tmp_path):
    det = tiny_detector()
    predictor = det.model.roi_heads.box_predictor.cls_score
    with torch.no_grad():  # the classifier now says "car" (label 1) for every box
        predictor.weight.zero_()
        predictor.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    path = tmp_path / "m.h5"
    stats = extract_memory(det, ListDataset(make_items()), path, keep="correct", progress=False)
    assert (stats.fg_rows, stats.fg_dropped, stats.bg_rows) == (1, 2, 3)
    with h5py.File(path) as f:
        assert f["fg/labels"][()].tolist() == [1] and f["fg/object_ids"][()].tolist() == [0]
        assert f.attrs["keep"] == "correct"


def test_extraction_failure_leaves_no_file_and_bad_params_are_errors(tmp_path):
    det = tiny_detector()
    path = tmp_path / "m.h5"
    with pytest.raises(RuntimeError, match="unreadable"):
        extract_memory(det, ListDataset(make_items(), fail_at=2), path, batch_size=1, chunk_rows=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VspaError, match="extract_memory.keep 'some'"):
        extract_memory(det, ListDataset(make_items()), path, keep="some")

    class ThreeClasses(ListDataset):
        class_names = ["a", "b", "c"]

    with pytest.raises(VspaError, match=r"m\.h5: the dataset has 3 classes .* trained for 2"):
        extract_memory(det, ThreeClasses(make_items()), path)


# --------------------------------------------------------------------------- the stages


def test_stages_extract_then_subsample(tmp_path, monkeypatch):

    from PIL import Image

    from vspa.data.coco import write_coco
    from vspa.detection import checkpoint

    split = tmp_path / "source_train"
    (split / "images").mkdir(parents=True)
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(split / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"images/{i}.png", "width": 64, "height": 32})
        for j in range(2):
            annotations.append(
                {
                    "id": 2 * i + j,
                    "image_id": i,
                    "category_id": j + 1,
                    "bbox": [4 + 20 * j, 4, 16, 20],
                    "area": 320.0,
                    "iscrowd": 0,
                    "object_id": 50 + 2 * i + j,
                }
            )
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    write_coco(split / "annotations.json", images, annotations, categories, info={})
    det = tiny_detector()
    checkpoint.save(tmp_path / "model.pt", det, detector_config(**TINY), CLASSES)
    params = tmp_path / "params.yaml"
    params.write_text(
        "scenario: synth_fog\n"
        "extract_memory: {keep: all, batch_size: 3, device: cpu, chunk_rows: 5}\n"
        "subsample: {method: coreset, fg_ratio: 0.5, bg_ratio: 0.5, projection_dim: 0, seed: 0, device: cpu}\n"
    )
    full, sub = tmp_path / "full.h5", tmp_path / "sub.h5"
    stage_main("extract_memory")(
        params=str(params), model=tmp_path / "model.pt", data=split, out=full, stats=tmp_path / "extract.json"
    )
    bank = open_memory(full, expected_dim=1024)
    assert len(bank.fg_labels) == 8 and len(bank.bg_image_ids) == 4
    assert sorted(bank.fg_object_ids.tolist()) == list(range(50, 58))
    assert len(bank.attrs["checkpoint_sha256"]) == 64 and len(bank.attrs["dataset_sha256"]) == 64
    assert json.loads((tmp_path / "extract.json").read_text())["fg_rows"] == 8

    stage_main("subsample")(params=str(params), memory=full, out=sub, coverage=tmp_path / "coverage.json")
    subset = open_memory(sub)
    assert len(subset.fg_labels) == 4 and len(subset.bg_image_ids) == 2
    assert np.array_equal(subset.fg_features, bank.fg_features[subset.fg_index])
    assert np.array_equal(subset.bg_features, bank.bg_features[subset.bg_index])
    coverage = json.loads((tmp_path / "coverage.json").read_text())
    assert coverage["fg"]["per_class"]["car"]["kept"] == 2 and coverage["bg"]["kept"] == 2
    assert coverage["fg"]["radius"] > 0

    with pytest.raises(SystemExit) as exc:  # a bad memory file: one line, exit status 2
        stage_main("subsample")(params=str(params), memory=tmp_path / "nope.h5", out=sub, coverage=tmp_path / "c.json")
    assert exc.value.code == 2
