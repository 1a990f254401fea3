"""The embedded benchmark generator (vspa.data.synth) and the prepare stage on it."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vspa.data import SPLITS
from vspa.data.prepare import prepare
from vspa.data.synth import (
    FOCAL_PER_WIDTH,
    MAX_OCCLUSION,
    MIN_HEIGHT_PX,
    MIN_WIDTH_PX,
    _car,
    _person,
    _truck,
    apply_fog,
    generate_benchmark,
    render_image,
)
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"source_train": 5, "source_test": 4, "target_train": 4, "target_test": 4}  # 17 images: the pool path


def _generate(out, scenario="synth_fog", sizes=SMALL, seed=0, workers=1, beta=0.04):
    return generate_benchmark(
        out,
        scenario,
        sizes,
        seed=seed,
        height=64,
        width=128,
        fog_beta=beta,
        fog_airlight=0.8,
        workers=workers,
        progress=False,
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def _annotations(split_dir: Path) -> dict:
    return json.loads((split_dir / "annotations.json").read_text())


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path):
    one = _generate(tmp_path / "a", workers=1)
    two = _generate(tmp_path / "b", workers=2)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 4 + 3 * sum(SMALL.values())
    assert files_a == files_b
    assert one["splits"] == two["splits"]
    for split in SPLITS:  # the summary counts what the files hold
        anns = _annotations(tmp_path / "a" / split)
        assert one["splits"][split]["images"] == len(anns["images"]) == SMALL[split]
        assert one["splits"][split]["objects"] == len(anns["annotations"])
        assert sum(one["splits"][split]["per_class"].values()) == len(anns["annotations"])


def test_different_seed_gives_different_images():
    a = render_image("synth_fog", "source_train", 0, 0, 64, 128, 0.04, 0.8)
    b = render_image("synth_fog", "source_train", 0, 1, 64, 128, 0.04, 0.8)
    c = render_image("synth_fog", "source_train", 1, 0, 64, 128, 0.04, 0.8)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    again = render_image("synth_fog", "source_train", 0, 0, 64, 128, 0.04, 0.8)
    assert np.array_equal(a.image, again.image) and np.array_equal(a.instances, again.instances)


def test_an_image_depends_only_on_its_index(tiny_benchmark):
    from conftest import TINY_HEIGHT, TINY_WIDTH

    alone = render_image("synth_fog", "target_train", 3, 0, TINY_HEIGHT, TINY_WIDTH, 0.04, 0.8)
    split = Path(tiny_benchmark) / "target_train"
    assert np.array_equal(alone.image, _png(split / "images/000003.png")[..., :3])
    assert np.array_equal(alone.instances, _png(split / "instances/000003.png"))


# --------------------------------------------------------------------------- labels


def test_boxes_are_tight_boxes_of_the_visible_masks_and_every_instance_is_labelled(tiny_benchmark):
    checked = 0
    for split in SPLITS:
        folder = Path(tiny_benchmark) / split
        data = _annotations(folder)
        assert [c["name"] for c in data["categories"]] == ["car", "person", "truck"]
        by_image = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(ann)
        for img in data["images"]:
            inst = _png(folder / img["instance_file"])
            assert inst.dtype == np.uint16 and inst.shape == (img["height"], img["width"])
            anns = by_image[img["id"]]
            values = [a["instance_value"] for a in anns]
            assert len(set(values)) == len(values)
            assert set(np.unique(inst)) - {0} == set(values)  # no unlabelled instance pixel
            for ann in anns:
                ys, xs = np.nonzero(inst == ann["instance_value"])
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert ann["area"] == len(xs)
                assert ann["bbox"][3] >= MIN_HEIGHT_PX and ann["bbox"][2] >= MIN_WIDTH_PX
                assert 0.0 <= ann["attributes"]["occlusion"] <= MAX_OCCLUSION
                assert ann["attributes"]["orientation"] in ("front", "back", "side", "side_mirrored")
                assert len(ann["attributes"]["color"]) == 3
                checked += 1
    assert checked > 20


def test_object_ids_are_unique_within_and_across_splits(tiny_benchmark):
    ids = []
    for split in SPLITS:
        anns = _annotations(Path(tiny_benchmark) / split)["annotations"]
        split_ids = [a["object_id"] for a in anns]
        assert len(set(split_ids)) == len(split_ids)
        assert len({a["id"] for a in anns}) == len(anns)
        ids += split_ids
    assert len(set(ids)) == len(ids)


def test_depth_map_holds_object_depth_and_size_follows_one_over_depth(tiny_benchmark):
    from conftest import TINY_WIDTH

    focal = FOCAL_PER_WIDTH * TINY_WIDTH
    heights = {"car": (1.4, 1.7), "person": (1.55, 1.9), "truck": (3.0, 3.8)}
    names = {1: "car", 2: "person", 3: "truck"}
    checked = 0
    for split in SPLITS:
        folder = Path(tiny_benchmark) / split
        data = _annotations(folder)
        images = {img["id"]: img for img in data["images"]}
        for ann in data["annotations"]:
            img = images[ann["image_id"]]
            depth_cm = _png(folder / img["depth_file"])
            inst = _png(folder / img["instance_file"])
            z = ann["attributes"]["depth_m"]
            assert np.all(np.abs(depth_cm[inst == ann["instance_value"]] - z * 100) <= 1)
            if ann["attributes"]["occlusion"] == 0:  # whole object visible: its box height is its size
                lo, hi = heights[names[ann["category_id"]]]
                h = ann["bbox"][3]
                assert lo * focal / z - 1 <= h <= hi * focal / z + 1
                checked += 1
    assert checked > 5


def test_orientations_have_different_shapes():
    colour = np.array([0.2, 0.3, 0.8], np.float32)

    def sprite(fn, orientation):
        return fn(np.random.default_rng(0), colour, orientation, 20.0)

    for fn in (_car, _truck, _person):
        front, back, side = sprite(fn, "front"), sprite(fn, "back"), sprite(fn, "side")
        assert front.rgb.shape == back.rgb.shape and not np.array_equal(front.rgb, back.rgb)
        assert not np.array_equal(side.rgb, side.rgb[:, ::-1])  # side and side_mirrored differ
    for fn in (_car, _truck):  # vehicles: long from the side, narrow from the front
        assert sprite(fn, "side").w > 1.8 * sprite(fn, "front").w

    def red(s):
        return int(((s.rgb[..., 0] > 0.8) & (s.rgb[..., 1] < 0.1)).sum())

    assert red(sprite(_car, "back")) > 0 and red(sprite(_car, "front")) == 0  # tail lights only at the back


# --------------------------------------------------------------------------- domains


def test_apply_fog_on_a_hand_computed_pixel():
    image = np.array([[[0.2, 0.4, 0.6], [0.2, 0.4, 0.6]]])
    depth = np.array([[10.0, 0.0]])
    out = apply_fog(image, depth, beta=0.05, airlight=0.8)
    # t = exp(-0.5) = 0.60653066; I = J t + 0.8 (1 - t)
    assert np.allclose(out[0, 0], [0.43608160, 0.55738774, 0.67869387], atol=1e-6)
    assert np.allclose(out[0, 1], image[0, 1])  # depth 0: no fog
    assert np.allclose(apply_fog(image, np.full((1, 2), 1e4), 0.05, 0.8), 0.8)  # far away: airlight
    assert image[0, 0, 0] == 0.2  # pure
    with pytest.raises(ValueError):
        apply_fog(image, np.zeros((2, 2)), 0.05, 0.8)


def test_target_is_the_fogged_scene_of_its_depth_map():
    clear = render_image("synth_fog", "target_test", 2, 0, 96, 192, 0.0, 0.8)
    foggy = render_image("synth_fog", "target_test", 2, 0, 96, 192, 0.04, 0.8)
    assert np.array_equal(clear.instances, foggy.instances)
    depth = clear.depth_cm.astype(np.float64) / 100
    expected = apply_fog(clear.image / 255.0, depth, 0.04, 0.8)
    # the same sensor noise (sigma 0.01) is added after the fog: it passes the fog with factor 1 - t
    error = np.abs(foggy.image / 255.0 - expected)
    assert error.max() < 0.06 and error.mean() < 0.01
    far = depth > 100
    assert far.any() and np.abs(foggy.image[far] / 255.0 - 0.8).mean() < 0.02
    source = render_image("synth_fog", "source_test", 2, 0, 96, 192, 0.04, 0.8)
    assert np.array_equal(source.image, render_image("synth_fog", "source_test", 2, 0, 96, 192, 0.0, 0.8).image)


def test_synth_real_is_car_only_and_its_domains_look_different(tmp_path):
    summary = _generate(
        tmp_path, "synth_real", {"source_train": 2, "source_test": 1, "target_train": 2, "target_test": 1}
    )
    for split in SPLITS:
        data = _annotations(tmp_path / split)
        assert data["categories"] == [{"id": 1, "name": "car"}]
        assert {a["category_id"] for a in data["annotations"]} <= {1}
        assert list(summary["splits"][split]["per_class"]) == ["car"]
    flat = _png(tmp_path / "source_train/images/000000.png")
    real = _png(tmp_path / "target_train/images/000000.png")
    colours = lambda im: len(np.unique(im.reshape(-1, 3), axis=0))  # noqa: E731
    assert colours(flat) < 400 < 2000 < colours(real)  # flat game colours vs texture and noise


def test_bad_arguments_name_the_param(tmp_path):
    cases = [
        ({"scenario": "nope"}, "nope"),
        ({"sizes": {"source_train": 1}}, "prepare."),
        ({"sizes": {**SMALL, "source_test": -1}}, "prepare.source_test"),
        ({"height": 10}, "prepare.height"),
        ({"fog_beta": 3.0}, "prepare.fog_beta"),
    ]
    for override, needle in cases:
        kwargs = dict(
            out_dir=tmp_path / "x",
            scenario="synth_fog",
            sizes=SMALL,
            seed=0,
            height=64,
            width=128,
            fog_beta=0.04,
            fog_airlight=0.8,
            workers=1,
            progress=False,
        )
        kwargs.update(override)
        with pytest.raises(VspaError, match=needle.replace(".", r"\.")):
            generate_benchmark(**kwargs)


# --------------------------------------------------------------------------- the prepare stage


def _params(tmp_path: Path, **prepare) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(
        {
            "height": 64,
            "width": 128,
            "source_train": 2,
            "source_test": 1,
            "target_train": 2,
            "target_test": 1,
            "target_val": 1,
            **prepare,
        }
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_prepare_stage_generates_and_a_failed_run_keeps_the_old_dataset(tmp_path):
    out, summary_path = tmp_path / "data" / "benchmark", tmp_path / "reports" / "summary.json"
    summary = prepare(_params(tmp_path), out, summary_path, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted((*SPLITS, "target_val"))
    assert json.loads(summary_path.read_text()) == summary
    assert summary["source"] == "synth" and summary["splits"]["target_train"]["images"] == 2
    before = _files(out)

    with pytest.raises(VspaError, match="fog_beta"):
        prepare(_params(tmp_path, fog_beta=7), out, summary_path, workers=1, progress=False)
    assert _files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["benchmark"]  # no temporary folder left behind


@pytest.mark.slow
def test_default_sizes_need_under_a_minute_of_two_cores(tmp_path):
    """CPU seconds (this process + the workers), not wall time: other jobs on the machine do not count."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]
    sizes = {split: params[split] for split in (*SPLITS, "target_val")}

    def cpu_seconds():
        own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    start = cpu_seconds()
    summary = generate_benchmark(
        tmp_path,
        "synth_fog",
        sizes,
        seed=0,
        height=params["height"],
        width=params["width"],
        fog_beta=params["fog_beta"],
        fog_airlight=params["fog_airlight"],
        workers=2,
        progress=False,
    )
    assert cpu_seconds() - start < 80  # i.e. under 40 s of wall time on two free cores
    assert all(math.isclose(s["objects_per_image"], 4, abs_tol=2) for s in summary["splits"].values())


def test_target_val_is_its_own_stream_and_leaves_the_other_splits_unchanged(tiny_benchmark, tmp_path):
    """Adding the optional validation split changes no byte of the four others; its images are foggy target
    scenes distinct from target test's, and its object ids are unique across all five splits."""
    from conftest import TINY_HEIGHT, TINY_WIDTH, TINY_SIZES

    out = tmp_path / "with_val"
    generate_benchmark(
        out,
        "synth_fog",
        {**TINY_SIZES, "target_val": 3},
        seed=0,
        height=TINY_HEIGHT,
        width=TINY_WIDTH,
        fog_beta=0.04,
        fog_airlight=0.8,
        workers=1,
        progress=False,
    )
    for split in SPLITS:
        for name in ("annotations.json", "images/000000.png", "images/000003.png"):
            assert (out / split / name).read_bytes() == (Path(tiny_benchmark) / split / name).read_bytes()
    val = _annotations(out / "target_val")
    assert len(val["images"]) == 3 and val["info"]["domain"] == "target" and val["info"]["foggy"]
    assert (out / "target_val" / "images/000000.png").read_bytes() != (
        out / "target_test" / "images/000000.png"
    ).read_bytes()
    ids = [a["object_id"] for s in (*SPLITS, "target_val") for a in _annotations(out / s)["annotations"]]
    assert len(set(ids)) == len(ids)
    with pytest.raises(VspaError, match="target_val"):
        generate_benchmark(
            tmp_path / "bad",
            "synth_fog",
            {**TINY_SIZES, "source_val": 3},
            seed=0,
            height=TINY_HEIGHT,
            width=TINY_WIDTH,
            fog_beta=0.04,
            fog_airlight=0.8,
            workers=1,
            progress=False,
        )


def test_high_diversity_patterns_stretches_and_a_rare_class(tmp_path):
    """prepare.diversity: high is deterministic, labels stay tight (boxes = visible masks), every object gets a
    pattern, truck becomes rare, and colours spread over the hue circle; standard is the benchmark as before."""
    sizes = {"source_train": 40, "source_test": 0, "target_train": 2, "target_test": 0}
    high = generate_benchmark(
        tmp_path / "high", "synth_fog", sizes, 0, 96, 192, 0.04, 0.8, workers=1, progress=False, diversity="high"
    )
    std = generate_benchmark(tmp_path / "std", "synth_fog", sizes, 0, 96, 192, 0.04, 0.8, workers=1, progress=False)
    assert high["diversity"] == "high" and "diversity" not in std  # standard summaries and files as before
    data = _annotations(tmp_path / "high" / "source_train")
    assert data["info"]["diversity"] == "high"
    anns = data["annotations"]
    patterns = [a["attributes"]["pattern"] for a in anns]
    assert set(patterns) == {"plain", "two_tone", "stripes", "checks", "speckles"}
    assert all("pattern" not in a["attributes"] for a in _annotations(tmp_path / "std" / "source_train")["annotations"])

    def truck_share(summary):
        split = summary["splits"]["source_train"]
        return split["per_class"]["truck"] / split["objects"]

    assert truck_share(high) < 0.12 < truck_share(std)
    import colorsys

    def hue_bins(annotations, cls_id):
        hues = [
            colorsys.rgb_to_hsv(*(c / 255 for c in a["attributes"]["color"]))[0]
            for a in annotations
            if a["category_id"] == cls_id
        ]
        return len({int(h * 12) % 12 for h in hues})

    assert hue_bins(anns, 1) >= 10  # cars of (nearly) every hue
    for img in data["images"]:  # tight boxes of the (stretched, patterned) visible masks
        inst = _png(tmp_path / "high" / "source_train" / img["instance_file"])
        for a in (a for a in anns if a["image_id"] == img["id"]):
            ys, xs = np.nonzero(inst == a["instance_value"])
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
    again = render_image("synth_fog", "source_train", 3, 0, 96, 192, 0.04, 0.8, "high")
    ref = np.array(Image.open(tmp_path / "high" / "source_train" / "images" / "000003.png"))
    assert np.array_equal(again.image, ref)
    assert not np.array_equal(render_image("synth_fog", "source_train", 3, 0, 96, 192, 0.04, 0.8).image, ref)
    with pytest.raises(VspaError, match="prepare.diversity"):
        generate_benchmark(tmp_path / "bad", "synth_fog", sizes, 0, 96, 192, 0.04, 0.8, diversity="extreme")
