"""evaluate.subsets: a subset of a split's images is scored on its own, from the same detections."""

import numpy as np
import torch
import pytest

from vspa.evaluation.runner import score, subset_indices
from vspa.utils import VspaError

from loaders import stage_main

IMAGES = [{"id": 0, "fog_beta": 0.02}, {"id": 1, "fog_beta": 0.01}, {"id": 2, "fog_beta": 0.02}, {"id": 3}]


def test_subset_indices_match_fields_numerically():
    assert subset_indices(IMAGES, {"fog_beta": 0.02}, "b", "x.json") == [0, 2]
    assert subset_indices(IMAGES, {"fog_beta": 1e-2}, "b", "x.json") == [1]
    with pytest.raises(VspaError, match=r"values there: \{'fog_beta': \['0.01', '0.02'\]\}"):  # a string is no number
        subset_indices(IMAGES, {"fog_beta": "0.01"}, "b", "x.json")
    with pytest.raises(VspaError, match=r"evaluate.subsets.b = \{'fog_beta': 0.03\}: no image of x.json matches"):
        subset_indices(IMAGES, {"fog_beta": 0.03}, "b", "x.json")
    with pytest.raises(VspaError, match="expected a mapping"):
        subset_indices(IMAGES, [0.02], "b", "x.json")


def test_subset_score_equals_scoring_only_those_images():
    # image 0: one car found (AP 100 alone); image 1: one car missed, a false positive with a higher score
    gts = [
        {"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1])},
        {"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1])},
    ]
    dets = [
        {"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1]), "scores": np.array([0.5])},
        {"boxes": np.array([[50, 50, 60, 60]], float), "labels": np.array([1]), "scores": np.array([0.9])},
    ]
    whole, _ = score(dets, gts, ["car"], 0.5)
    only0, _ = score(dets[:1], gts[:1], ["car"], 0.5)
    assert only0["mAP"] == pytest.approx(100.0)
    # both images: ranked FP (0.9) then TP (0.5): recall 0.5 at precision 0.5 -> all-point AP 25
    assert whole["mAP"] == pytest.approx(25.0)
    assert only0["num_images"] == 1 and whole["num_images"] == 2


def test_foggy_cityscapes_scenario_scores_each_fog_level(tmp_path, monkeypatch):
    """The cityscapes_foggy scenario end to end on its smoke fixture: prepare tags every test image with its fog
    level, and the evaluate stage (the scenario's evaluate.subsets) writes one block per level, whose image
    counts add up to the whole split's. A small random detector stands in for VGG16 (the numbers are not the
    point)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import detector_config

    from vspa.config import compose
    from vspa.data.smoke import write_fixture
    from vspa.detection.checkpoint import save
    from vspa.detection.model import build_detector

    root = Path(__file__).resolve().parents[1]
    data_root = write_fixture("cityscapes_foggy", tmp_path / "datasets")
    params = compose(root / "conf", ["scenario=cityscapes_foggy"])
    params["data"]["root"] = str(data_root)
    params["evaluate"].update(device="cpu", batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "stages" / "prepare.py"),
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
    classes = params["prepare"]["classes"]
    torch.manual_seed(0)
    cfg = detector_config(min_size=64, max_size=128, small_width=8)
    save(tmp_path / "model.pt", build_detector(cfg, len(classes)), cfg, list(classes))
    monkeypatch.chdir(tmp_path)
    stage_main("evaluate")(
        params=str(tmp_path / "params.yaml"),
        model=tmp_path / "model.pt",
        data=tmp_path / "bench/target_test",
        name="vspa",
        metrics_dir=Path("m"),
        plots_dir=Path("pr"),
        info_dir=Path("m/info"),
    )
    metrics = json.loads((tmp_path / "m" / "vspa.json").read_text())
    info = json.loads((tmp_path / "m" / "info" / "vspa.json").read_text())
    assert set(metrics["subsets"]) == {"beta_0.02", "beta_0.01", "beta_0.005"}
    assert list(metrics["subsets"]["beta_0.02"]) == ["mAP", "AP", "coco_mAP50", "coco_AP50"]
    counts = [info["subsets"][k]["num_images"] for k in ("beta_0.02", "beta_0.01", "beta_0.005")]
    assert counts[0] == counts[1] == counts[2] and sum(counts) == info["num_images"]
