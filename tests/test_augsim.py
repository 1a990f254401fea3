"""AugSim / FoggyAugSim (vspa.data.augsim) and the augsim stages: hand-made images, the tiny benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vspa.data.augsim import (
    augmented_count,
    choose_variants,
    color_weight,
    ground_plane_depth,
    make_augsim,
    make_foggy,
    make_variant_set,
    recolor,
    transform_attributes,
    transform_objects,
)
from vspa.data import augsim_sets as augsim_build
from vspa.data.coco import write_coco
from vspa.reporting import augsim as augsim_report
from vspa.utils import VspaError

from loaders import stage_main

ROOT = Path(__file__).resolve().parents[1]


def _background(height: int, width: int) -> np.ndarray:
    """Every pixel different: r = 10 * row, g = column, b = 7."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([10 * rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# --------------------------------------------------------------------------- the colour transform


def test_recolor_rotates_hue_and_inverts_grey_by_hand():
    assert recolor(np.array([200, 30, 30], np.uint8)).tolist() == [30, 200, 200]  # red -> cyan
    assert recolor(np.array([40, 90, 200], np.uint8)).tolist() == [200, 150, 40]  # blue -> orange
    assert recolor(np.array([100, 100, 100], np.uint8), weight=0.0).tolist() == [155, 155, 155]
    # half way between complement (100) and inversion (155): rint(127.5) = 128
    assert recolor(np.array([100, 100, 100], np.uint8), weight=0.5).tolist() == [128, 128, 128]


def test_color_weight_separates_grey_from_coloured_objects():
    grey = np.array([[200, 200, 198], [60, 61, 60], [120, 118, 121]], np.uint8)
    red = np.array([[200, 30, 30], [150, 20, 25], [100, 100, 100]], np.uint8)  # one grey pixel (tyre)
    assert color_weight(grey) == pytest.approx(2 / 64)  # median chroma 2
    assert color_weight(red) == 1.0
    assert color_weight(np.zeros((0, 3), np.uint8)) == 1.0


def test_color_changes_exactly_the_mask_pixels():
    image = _background(6, 8)
    instances = np.zeros((6, 8), np.uint16)
    instances[1:3, 1:4] = 1
    instances[4, 5:8] = 2
    image[instances == 1] = (220, 40, 40)
    image[instances == 2] = (30, 60, 200)
    out, inst_out, _ = transform_objects(image, [[1, 1, 3, 2], [5, 4, 3, 1]], "color", instances, [1, 2])
    changed = (out != image).any(axis=-1)
    assert np.array_equal(changed, instances > 0)
    assert out[1, 1].tolist() == [40, 220, 220] and out[4, 6].tolist() == [200, 170, 30]
    assert np.array_equal(inst_out, instances)


def test_color_without_masks_changes_only_box_pixels():
    image = _background(6, 8)
    image[2:4, 3:6] = (250, 10, 120)  # the object, inside its box
    out, inst_out, _ = transform_objects(image, [[2, 1, 5, 4]], "color")  # box: rows 1..4, cols 2..6
    changed = (out != image).any(axis=-1)
    box = np.zeros((6, 8), bool)
    box[1:5, 2:7] = True
    assert not changed[~box].any()
    assert changed[2:4, 3:6].all()
    assert out[2, 3].tolist() == [10, 250, 140]
    assert inst_out is None


def test_attributes_follow_the_transform():
    attributes = {"color": [200, 30, 30], "orientation": "side", "occlusion": 0.1}
    assert transform_attributes(attributes, "color_flip") == {
        "color": [30, 200, 200],
        "orientation": "side_mirrored",
        "occlusion": 0.1,
    }
    assert transform_attributes(attributes, "flip")["color"] == [200, 30, 30]
    assert transform_attributes({"orientation": "front"}, "flip") == {"orientation": "front"}
    assert transform_attributes(attributes, "color", weight=0.0)["color"] == [55, 225, 225]


# --------------------------------------------------------------------------- the flip


def _l_shape():
    """An asymmetric 'L' in the box x=2, y=1, w=4, h=3 (columns 2..5, rows 1..3) of a 5x8 image."""
    image = _background(5, 8)
    instances = np.zeros((5, 8), np.uint16)
    for r, cols in ((1, [2]), (2, [2, 3]), (3, [2, 3, 4])):
        instances[r, cols] = 1
    image[instances == 1, 2] = 250  # object pixels: blue 250, red/green still encode the position
    depth = (100 * np.arange(40).reshape(5, 8)).astype(np.uint16)
    return image, instances, depth


def test_flip_mirrors_an_asymmetric_object_in_place():
    image, instances, depth = _l_shape()
    out, inst_out, depth_out = transform_objects(image, [[2, 1, 4, 3]], "flip", instances, [1], depth)
    expected = np.zeros((5, 8), np.uint16)
    for r, cols in ((1, [5]), (2, [4, 5]), (3, [3, 4, 5])):
        expected[r, cols] = 1
    assert np.array_equal(inst_out, expected)
    # the object's pixel at (3, 2) (bottom-left) is now at (3, 5) (bottom-right), and so on: c -> 7 - c
    for r, c in zip(*np.nonzero(expected)):
        assert out[r, c].tolist() == image[r, 7 - c].tolist()
        assert depth_out[r, c] == depth[r, 7 - c]
    # the pixels it left show the background mirrored into them from the other side of the box
    for r, c in ((1, 2), (2, 2), (2, 3), (3, 2)):
        assert out[r, c].tolist() == image[r, 7 - c].tolist() and instances[r, 7 - c] == 0
    untouched = (instances == 0) & (expected == 0)
    assert np.array_equal(out[untouched], image[untouched])
    assert np.array_equal(depth_out[untouched], depth[untouched])
    # colour + flip = the flip with the object's pixels recoloured (blue 250 -> its complement)
    both, _, _ = transform_objects(image, [[2, 1, 4, 3]], "color_flip", instances, [1])
    assert np.array_equal(both[expected == 0], out[expected == 0])
    assert both[3, 5].tolist() == recolor(image[3, 2]).tolist() != image[3, 2].tolist()


def test_flip_never_paints_over_another_object_and_fills_from_the_nearest_background():
    image = _background(1, 8)
    instances = np.array([[1, 1, 0, 2, 0, 0, 0, 0]], np.uint16)
    # A: box columns 0..3, mask columns 0,1 -> mirrored 3,2; column 3 belongs to B, so A gets only 2.
    # A leaves columns 0 and 1; the mirror of 0 is B's pixel, so it takes the nearest background (2).
    out, inst_out, _ = transform_objects(image, [[0, 0, 4, 1], [3, 0, 1, 1]], "flip", instances, [1, 2])
    assert inst_out.tolist() == [[0, 0, 1, 2, 0, 0, 0, 0]]
    assert np.array_equal(out[0, :4], image[0, [2, 2, 1, 3]])
    assert np.array_equal(out[0, 4:], image[0, 4:])


def test_flip_without_masks_mirrors_the_box_content():
    image = _background(6, 8)
    out, _, _ = transform_objects(image, [[2, 1, 5, 4]], "flip")
    assert np.array_equal(out[1:5, 2:7], image[1:5, 2:7][:, ::-1])
    outside = np.ones((6, 8), bool)
    outside[1:5, 2:7] = False
    assert np.array_equal(out[outside], image[outside])


# --------------------------------------------------------------------------- depth and fog


def test_ground_plane_depth_by_hand():
    depth = ground_plane_depth(10, 3, horizon=0.5, camera_height=1.5, vfov_deg=90.0, max_depth=100.0)
    # f = (10 / 2) / tan(45 deg) = 5; horizon at row 5.0; row 9 centre 9.5 -> 5 * 1.5 / 4.5
    assert depth[9, 0] == pytest.approx(5 * 1.5 / 4.5)
    assert depth[5, 2] == pytest.approx(15.0)  # centre 5.5
    assert depth[4, 1] == 100.0  # above the horizon
    assert (depth == depth[:, :1]).all()


def _one_image_split(folder: Path, pixel, depth_cm=None, bbox=(1, 1, 2, 2)):
    """A 4x4 split with one image of constant colour, an optional constant depth map, one box."""
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), pixel, np.uint8)).save(folder / "images/0.png")
    record = {"id": 0, "file_name": "images/0.png", "width": 4, "height": 4}
    if depth_cm is not None:
        (folder / "depth").mkdir()
        Image.fromarray(np.full((4, 4), depth_cm, np.uint16)).save(folder / "depth/0.png")
        record["depth_file"] = "depth/0.png"
    ann = {"id": 5, "image_id": 0, "category_id": 1, "bbox": list(bbox), "area": 4.0, "iscrowd": 0, "object_id": 42}
    write_coco(folder / "annotations.json", [record], [ann], [{"id": 1, "name": "car"}], {"domain": "source"})


def test_fog_on_a_hand_computed_pixel(tmp_path):
    _one_image_split(tmp_path / "src", (200, 100, 0), depth_cm=1000)
    counts = make_foggy(tmp_path / "src", tmp_path / "fog", beta=0.04, airlight=0.8)
    assert counts == {"depth_map": 1, "ground_plane": 0}
    t = math.exp(-0.04 * 10.0)
    expected = [int(255 * (c / 255 * t + 0.8 * (1 - t)) + 0.5) for c in (200, 100, 0)]
    assert expected == [201, 134, 67]  # 200 * 0.6703 + 204 * 0.3297 = 201.3, ...
    assert _read(tmp_path / "fog/images/0.png")[2, 3].tolist() == expected
    data = json.loads((tmp_path / "fog/annotations.json").read_text())
    assert data["annotations"][0]["object_id"] == 42 and data["annotations"][0]["id"] == 5
    assert data["info"]["domain"] == "target"


def test_fog_without_depth_uses_the_ground_plane(tmp_path):
    _one_image_split(tmp_path / "src", (200, 100, 0))
    make_foggy(
        tmp_path / "src",
        tmp_path / "fog",
        beta=0.1,
        airlight=1.0,
        horizon=0.5,
        camera_height=1.5,
        vfov_deg=90.0,
        max_depth=50.0,
    )
    fog = _read(tmp_path / "fog/images/0.png")
    t = math.exp(-0.1 * (2 * 1.5 / 1.5))  # row 3: f = 2, centre 3.5 - horizon 2.0 = 1.5 -> depth 2 m
    assert fog[3, 0, 1] == int(255 * (100 / 255 * t + (1 - t)) + 0.5)
    t_far = math.exp(-0.1 * 50.0)  # row 1 is above the horizon: max_depth
    assert fog[1, 0, 1] == int(255 * (100 / 255 * t_far + (1 - t_far)) + 0.5)


def test_bad_fog_params_and_missing_split_are_reported(tmp_path):
    _one_image_split(tmp_path / "src", (1, 2, 3))
    with pytest.raises(VspaError, match="fog_airlight"):
        make_foggy(tmp_path / "src", tmp_path / "fog", beta=0.1, airlight=2.0)
    with pytest.raises(VspaError, match="annotation file not found"):
        make_augsim(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "fog").exists() and not (tmp_path / "out").exists()


def test_masks_without_instance_values_are_reported(tmp_path):
    _one_image_split(tmp_path / "src", (1, 2, 3))
    data = json.loads((tmp_path / "src/annotations.json").read_text())
    (tmp_path / "src/instances").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "src/instances/0.png")
    data["images"][0]["instance_file"] = "instances/0.png"
    (tmp_path / "src/annotations.json").write_text(json.dumps(data))
    with pytest.raises(VspaError, match=r"annotation id\(s\) \[5\].*instance_value"):
        make_augsim(tmp_path / "src", tmp_path / "out", fraction=1.0)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- whole splits


@pytest.fixture(scope="module")
def augsim_sets(tiny_benchmark, tmp_path_factory):
    """AugSim (fraction 0.25), the three variant sets and FoggyAugSim of the tiny benchmark's source_train."""
    out = tmp_path_factory.mktemp("augsim")
    src = Path(tiny_benchmark) / "source_train"
    counts = make_augsim(src, out / "augsim", fraction=0.25, seed=3)
    for variant in ("color", "flip", "color_flip"):
        make_variant_set(src, out / "pairing" / variant, variant)
    make_foggy(out / "augsim", out / "foggy", beta=0.04, airlight=0.8)
    return {"src": src, "out": out, "counts": counts}


def _split(folder: Path):
    data = json.loads((folder / "annotations.json").read_text())
    by_image = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return data, {img["id"]: img for img in data["images"]}, by_image


def test_exactly_a_quarter_of_the_images_change(augsim_sets):
    src, out = augsim_sets["src"], augsim_sets["out"] / "augsim"
    data, images, by_image = _split(src)
    aug_data, aug_images, aug_by_image = _split(out)
    n = len(images)
    assert len(aug_images) == n and len(aug_data["annotations"]) == len(data["annotations"])
    changed = [
        i
        for i in images
        if not np.array_equal(_read(src / images[i]["file_name"]), _read(out / aug_images[i]["file_name"]))
    ]
    assert len(changed) == augmented_count(n, 0.25) == int(n * 0.25 + 0.5)
    assert augsim_sets["counts"]["none"] == n - len(changed)
    for i in images:
        variant = aug_images[i]["augsim"]["variant"]
        assert (variant == "none") == (i not in changed)
        assert {a["augsim"]["variant"] for a in aug_by_image[i]} <= {variant}
        if i not in changed:  # untouched images are byte-identical copies
            assert (src / images[i]["file_name"]).read_bytes() == (out / aug_images[i]["file_name"]).read_bytes()


def test_images_with_objects_are_chosen_first():
    variant_of = choose_variants(list(range(10, 18)), 0.5, seed=0, has_objects=[i < 2 for i in range(8)])
    changed = sorted(i for i, v in variant_of.items() if v != "none")
    assert len(changed) == 4 and changed[:2] == [10, 11]
    assert set(variant_of.values()) <= {"none", "color", "flip", "color_flip"}
    assert choose_variants(list(range(8)), 0.5, seed=0) == choose_variants(list(range(8)), 0.5, seed=0)
    with pytest.raises(VspaError, match="augsim.fraction must be in"):
        choose_variants([1], 1.5, seed=0)


def test_ids_link_each_object_to_its_original(augsim_sets):
    src, out = augsim_sets["src"], augsim_sets["out"]
    original = {a["id"]: a for a in _split(src)[0]["annotations"]}
    for folder in (out / "augsim", out / "foggy", out / "pairing" / "flip"):
        for ann in _split(folder)[0]["annotations"]:
            orig = original[ann["id"]]
            for key in ("object_id", "image_id", "category_id", "bbox", "instance_value"):
                assert ann[key] == orig[key], (folder, key)


@pytest.mark.parametrize("variant", ["color", "flip", "color_flip"])
def test_each_variant_changes_only_the_objects(augsim_sets, variant):
    """On the variant sets (every image of the split in one variant): pixels outside the objects' old and
    new masks are bit-identical, a recolour follows the mask exactly, a flip keeps the box."""
    src, out = augsim_sets["src"], augsim_sets["out"] / "pairing" / variant
    _, images, by_image = _split(src)
    _, new_images, new_by_image = _split(out)
    for i, anns in new_by_image.items():
        before, after = _read(src / images[i]["file_name"]), _read(out / new_images[i]["file_name"])
        inst_before = _read(src / images[i]["instance_file"])
        inst_after = _read(out / new_images[i]["instance_file"])
        outside = (inst_before == 0) & (inst_after == 0)
        assert np.array_equal(before[outside], after[outside])
        assert (before != after).any() or not anns
        for ann, orig in zip(anns, by_image[i]):
            assert ann["augsim"] == {"variant": variant} and ann["bbox"] == orig["bbox"]
            assert ann["area"] == np.count_nonzero(inst_after == ann["instance_value"])
            mask = inst_before == ann["instance_value"]
            weight = color_weight(before[mask])
            if variant == "color":  # the mask does not move, every object pixel is recoloured
                assert np.array_equal(after[mask], recolor(before[mask], weight))
            if "color" in variant:
                expected = recolor(np.array(orig["attributes"]["color"], np.uint8), weight).tolist()
                assert ann["attributes"]["color"] == expected
            if "flip" in variant and orig["attributes"]["orientation"] == "side":
                assert ann["attributes"]["orientation"] == "side_mirrored"
        if variant == "color":
            assert np.array_equal(inst_before, inst_after)


def test_augsim_images_equal_the_variant_sets(augsim_sets):
    """The pairing memory's version of an object is bit-identical to the object as AugSim shows it."""
    src, out = augsim_sets["src"], augsim_sets["out"]
    _, aug_images, _ = _split(out / "augsim")
    for i in aug_images:
        variant = aug_images[i]["augsim"]["variant"]
        other = src if variant == "none" else out / "pairing" / variant
        _, images, _ = _split(other)
        assert np.array_equal(_read(out / "augsim" / aug_images[i]["file_name"]), _read(other / images[i]["file_name"]))


# --------------------------------------------------------------------------- stages


def test_augsim_stage_writes_every_set(tiny_benchmark, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "scenario": "synth_fog",
                "augsim": {
                    "fraction": 0.5,
                    "seed": 1,
                    "fog_beta": 0.05,
                    "fog_airlight": 0.7,
                    "horizon": 0.5,
                    "camera_height": 1.5,
                    "vfov_deg": 60.0,
                    "max_depth": 300.0,
                },
            }
        )
    )
    # through the stage's main (dvc.yaml's cmd runs it only in `make test-slow`'s end-to-end run)
    stage_main("augsim")(
        params=str(params),
        src=Path(tiny_benchmark),
        augsim_out=tmp_path / "aug",
        foggy_out=tmp_path / "fog",
        summary=tmp_path / "summary.json",
        examples=tmp_path / "stage_ex.png",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    with Image.open(tmp_path / "stage_ex.png") as im:
        assert im.format == "PNG"
    n_train = len(json.loads((Path(tiny_benchmark) / "source_train/annotations.json").read_text())["images"])
    assert sum(summary["augsim"]["source_train"].values()) == n_train
    assert summary["augsim"]["source_train"]["none"] == n_train - augmented_count(n_train, 0.5)
    assert summary["pairing"] == {"color": n_train, "flip": n_train, "color_flip": n_train}
    assert summary["foggy"]["target_train"]["depth_map"] == n_train
    for path in ("aug/source_train", "aug/source_test", "aug/pairing/flip", "fog/target_train", "fog/target_test"):
        assert (tmp_path / path / "annotations.json").is_file()
    fog_info = json.loads((tmp_path / "fog/target_train/annotations.json").read_text())["info"]["fog"]
    assert fog_info["beta"] == 0.05 and fog_info["source"] == str(tmp_path / "aug/source_train")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    augsim_build.examples_figure(
        Path(tiny_benchmark) / "source_train", tmp_path / "aug/pairing", tmp_path / "ex.png", count=2
    )
    with Image.open(tmp_path / "ex.png") as im:
        width, height = im.size
    first = _read(Path(tiny_benchmark) / "source_train/images/000000.png")
    assert (width, height) == (4 * first.shape[1], 2 * first.shape[0])
    assert np.array_equal(_read(tmp_path / "ex.png")[: first.shape[0], : first.shape[1]], first)


def test_augsim_stage_reports_missing_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"scenario": "synth_fog", "augsim": {"fraction": 0.25}}))
    with pytest.raises(VspaError, match="lacks seed, fog_beta"):
        augsim_build.read_config(str(params))


def test_augsim_report_table_and_plot(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for name, value in (("exact_s0", 80.0), ("exact_s1", 82.0), ("color_flip_s0", 77.5), ("color_s0", 79.0)):
        (metrics / f"augsim_{name}.json").write_text(json.dumps({"mAP": value, "AP": {"car": value}}))
    (metrics / "source_on_target.json").write_text(json.dumps({"mAP": 1.0}))
    rows = {r["mode"]: r for r in augsim_report.summarize(augsim_report.collect(metrics))}
    assert rows["exact"]["mean"] == 81.0 and rows["exact"]["std"] == pytest.approx(math.sqrt(2.0))
    assert rows["exact"]["n"] == 2 and rows["color_flip"]["std"] == 0.0 and rows["flip"]["n"] == 0
    text = augsim_report.markdown(list(rows.values()), baseline=60.25)
    assert "| exact | Domain only (fog) | 81.0 | 1.4 | 2 | 80.9 |" in text
    assert "| source only | no adaptation | 60.2 |" in text
    assert "exact - color_flip = +3.5 points (paper: +4.2)" in text and "Missing (no metrics file): flip" in text
    (metrics / "augsim_source_only.json").write_text(json.dumps({"mAP": 60.25}))
    stage_main("augsim_report")(metrics_dir=metrics, out_dir=tmp_path / "out", baseline="augsim_source_only")
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert results["exact"] == {"mean": 81.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2, "seeds": [0, 1]}
    assert results["source_only"] == 60.25 and results["flip"]["n"] == 0
    assert (tmp_path / "out/table.md").read_text().startswith("# AugSim")
    with Image.open(tmp_path / "out/bar.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    (metrics / "augsim_flip_s0.json").write_text(json.dumps({"mAP": "n/a"}))
    with pytest.raises(VspaError, match="augsim_flip_s0.json: 'mAP' is 'n/a'"):
        augsim_report.collect(metrics)
