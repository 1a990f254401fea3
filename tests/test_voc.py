"""VOC AP50: hand-computed cases, matching rules, ignore regions, the pycocotools cross-check, the runner."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from vspa.evaluation import coco_ap50, evaluate_detections, voc_ap
from vspa.evaluation.runner import downsample_curve, run_detector, write_pr_csv
from vspa.utils import VspaError

from loaders import stage_main


def det(boxes, labels, scores):
    return {
        "boxes": np.asarray(boxes, float).reshape(-1, 4),
        "labels": np.asarray(labels, int),
        "scores": np.asarray(scores, float),
    }


def gt(boxes, labels, **extra):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int), **extra}


# --------------------------------------------------------------------------- voc_ap


def test_voc_ap_all_point_on_hand_computed_curve():
    # Points (r, p): (.2, 1), (.4, .5), (.4, .8), (.8, .4). Envelope (max precision at recall >= r):
    # 1 on (0, .2], .8 on (.2, .4], .4 on (.4, .8], 0 beyond the last recall.
    # AP = .2*1 + .2*.8 + .4*.4 + .2*0 = 0.52. (The 11-point VOC2007 metric would give 6.2/11 = 0.5636.)
    assert voc_ap([0.2, 0.4, 0.4, 0.8], [1.0, 0.5, 0.8, 0.4]) == pytest.approx(0.52)


def test_voc_ap_perfect_empty_and_bad_input():
    assert voc_ap([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    assert voc_ap([], []) == 0.0
    with pytest.raises(VspaError, match="recall has 2 points but precision has 1"):
        voc_ap([0.1, 0.2], [1.0])
    with pytest.raises(VspaError, match="non-decreasing"):
        voc_ap([0.5, 0.2], [1.0, 1.0])


# --------------------------------------------------------------------------- evaluate_detections


def hand_case():
    """2 images, 3 GT cars, 4 car detections (a duplicate and a low-IoU one)."""
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1]), gt([[0, 0, 10, 10]], [1])]
    dets = [
        det(
            [
                [0, 0, 10, 10],  # 0.9: IoU 1 with GT A -> TP
                [1, 0, 11, 10],  # 0.8: IoU 90/110 = .82 with A, which is taken -> FP (duplicate)
                [20, 20, 30, 45],
            ],  # 0.6: IoU 100/250 = .4 with B -> FP (low IoU)
            [1, 1, 1],
            [0.9, 0.8, 0.6],
        ),
        det([[0, 0, 10, 10]], [1], [0.7]),  # 0.7: IoU 1 with GT C -> TP
    ]
    return dets, gts


def test_hand_case_ap_worked_out():
    # Descending score: .9 TP, .8 FP, .7 TP, .6 FP; 3 GT.
    # recall    = 1/3, 1/3, 2/3, 2/3
    # precision = 1,   1/2, 2/3, 1/2   -> envelope 1, 2/3, 2/3, 1/2
    # AP = (1/3 - 0) * 1 + (2/3 - 1/3) * 2/3 + (1 - 2/3) * 0 = 1/3 + 2/9 = 5/9 = 0.5556
    dets, gts = hand_case()
    result = evaluate_detections(dets, gts, ["car", "person"])
    car = result.classes[0]
    assert car.ap == pytest.approx(5 / 9)
    np.testing.assert_allclose(car.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(car.precision, [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(car.scores, [0.9, 0.8, 0.7, 0.6])
    assert (car.n_gt, car.n_det) == (3, 4)
    # person has no GT and no detection: null AP, left out of the mean
    assert result.ap["person"] is None
    assert result.mAP == pytest.approx(5 / 9)
    out = json.loads(json.dumps(result.to_json()))
    assert out["mAP"] == pytest.approx(55.5556) and out["AP"] == {"car": pytest.approx(55.5556), "person": None}
    assert out["num_images"] == 2 and out["num_gt"] == {"car": 3, "person": 0}


def test_score_order_decides_the_curve():
    # The low-IoU FP now outranks the second TP: TP, FP, FP, TP -> precision 1, 1/2, 1/3, 1/2;
    # envelope 1, 1/2, 1/2, 1/2 -> AP = 1/3 * 1 + 1/3 * 1/2 = 1/2.
    dets, gts = hand_case()
    dets[0]["scores"] = np.array([0.9, 0.8, 0.75])
    assert evaluate_detections(dets, gts, ["car"]).ap["car"] == pytest.approx(0.5)


def test_equal_scores_keep_input_order():
    # One GT in image 1; an FP in image 0 and the TP in image 1 share score 0.5. Stable order = image
    # order: FP first -> precision 0, 1/2 at recall 0, 1 -> AP 0.5. With the images swapped, TP first -> 1.
    img_fp = (det([[50, 50, 60, 60]], [1], [0.5]), gt(np.zeros((0, 4)), []))
    img_tp = (det([[0, 0, 10, 10]], [1], [0.5]), gt([[0, 0, 10, 10]], [1]))
    for images, expected in (([img_fp, img_tp], 0.5), ([img_tp, img_fp], 1.0)):
        dets, gts = zip(*images)
        assert evaluate_detections(list(dets), list(gts), ["car"]).ap["car"] == pytest.approx(expected)


def test_duplicate_does_not_fall_back_to_second_best_gt():
    # Two overlapping GT; both detections' best GT is A (IoU 1 and 100/120 = .83), although the second
    # detection also overlaps B by IoU 80/120 = .67. VOC: the second one is an FP (COCO would give it B).
    gts = [gt([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1])]
    dets = [det([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.8])]
    car = evaluate_detections(dets, gts, ["car"]).classes[0]
    np.testing.assert_allclose(car.precision, [1.0, 0.5])
    np.testing.assert_allclose(car.recall, [0.5, 0.5])  # AP = 0.5 * 1
    assert car.ap == pytest.approx(0.5)


def test_iou_threshold_is_inclusive_and_configurable():
    # IoU of [0,0,10,20] with [0,0,10,10] is exactly 100/200 = 0.5.
    gts = [gt([[0, 0, 10, 10]], [1])]
    dets = [det([[0, 0, 10, 20]], [1], [0.9])]
    assert evaluate_detections(dets, gts, ["car"], iou_threshold=0.5).ap["car"] == pytest.approx(1.0)
    assert evaluate_detections(dets, gts, ["car"], iou_threshold=0.6).ap["car"] == pytest.approx(0.0)


def test_ignore_boxes_are_neither_tp_nor_fp():
    # GT car at A and a crowd region R. The detection inside R (score .95, the highest) would be an FP
    # ranked first (AP .5); ignored, the curve is one TP -> AP 1.
    crowd = [[100, 0, 200, 50]]
    dets = [det([[0, 0, 10, 10], [110, 5, 130, 40]], [1, 1], [0.9, 0.95])]
    without = evaluate_detections(dets, [gt([[0, 0, 10, 10]], [1])], ["car", "person"]).classes[0]
    with_ignore = evaluate_detections(dets, [gt([[0, 0, 10, 10]], [1], ignore_boxes=crowd)], ["car", "person"]).classes[
        0
    ]
    assert without.ap == pytest.approx(0.5)
    assert with_ignore.ap == pytest.approx(1.0)
    assert (with_ignore.n_det, with_ignore.n_ignored, len(with_ignore.precision)) == (2, 1, 1)
    # A region labelled 'person' does not excuse a car detection; one labelled 'car' does.
    as_person = gt([[0, 0, 10, 10]], [1], ignore_boxes=crowd, ignore_labels=[2])
    as_car = gt([[0, 0, 10, 10]], [1], ignore_boxes=crowd, ignore_labels=[1])
    assert evaluate_detections(dets, [as_person], ["car", "person"]).ap["car"] == pytest.approx(0.5)
    assert evaluate_detections(dets, [as_car], ["car", "person"]).ap["car"] == pytest.approx(1.0)


def test_ignore_region_does_not_absorb_a_duplicate_of_a_real_gt():
    # The duplicate hits the GT (IoU 1 >= .5) so it is an FP even though it also lies inside the crowd box.
    gts = [gt([[0, 0, 10, 10]], [1], ignore_boxes=[[0, 0, 50, 50]])]
    dets = [det([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.8])]
    car = evaluate_detections(dets, gts, ["car"]).classes[0]
    np.testing.assert_allclose(car.precision, [1.0, 0.5])


def test_class_without_gt_is_null_and_left_out_of_map():
    gts = [gt([[0, 0, 10, 10]], [1]), gt(np.zeros((0, 4)), [])]
    dets = [det([[0, 0, 10, 10]], [1], [0.9]), det([[5, 5, 20, 20]], [3], [0.8])]
    result = evaluate_detections(dets, gts, ["car", "person", "truck"])
    assert result.ap == {"car": pytest.approx(1.0), "person": None, "truck": None}
    assert result.mAP == pytest.approx(1.0)  # not (1 + 0) / 2
    assert result.classes[2].n_det == 1 and len(result.classes[2].recall) == 0


def test_no_detections_empty_images_and_tensors():
    gts = [gt([[0, 0, 10, 10]], [1]), gt(np.zeros((0, 4)), []), gt([[0, 0, 5, 5]], [2])]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    result = evaluate_detections([empty] * 3, gts, ["car", "person"])
    assert result.ap == {"car": 0.0, "person": 0.0} and result.mAP == 0.0
    assert evaluate_detections([], [], ["car"]).mAP is None
    tensors = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}]
    assert evaluate_detections(tensors, gts[:1], ["car"]).ap["car"] == pytest.approx(1.0)


def test_bad_input_names_the_entry():
    gts = [gt([[0, 0, 10, 10]], [1])]
    with pytest.raises(VspaError, match=r"detections\[0\].labels: labels must be integers in 1..2"):
        evaluate_detections([det([[0, 0, 10, 10]], [0], [0.9])], gts, ["car", "person"])
    with pytest.raises(VspaError, match="1 detection entries but 2 ground-truth"):
        evaluate_detections([det([[0, 0, 10, 10]], [1], [0.9])], gts * 2, ["car"])
    with pytest.raises(VspaError, match=r"ground_truths\[0\].boxes: expected shape \[N, 4\]"):
        evaluate_detections([det([[0, 0, 10, 10]], [1], [0.9])], [{"boxes": [[0, 0, 10]], "labels": [1]}], ["car"])
    with pytest.raises(VspaError, match=r"detections\[0\]: missing key\(s\) \['scores'\]"):
        evaluate_detections([{"boxes": [[0, 0, 1, 1]], "labels": [1]}], gts, ["car"])


# --------------------------------------------------------------------------- pycocotools cross-check


def random_split(seed: int, n_images: int = 40):
    """Seeded GT on a grid of disjoint cells (one detection can reach IoU .5 with at most one GT, so VOC
    and COCO match identically), jittered true detections, duplicates, random false positives, wrong
    labels and class-specific crowd regions in free cells. Class 3 never has GT."""
    rng = np.random.default_rng(seed)
    cells = [(x, y) for x in range(0, 320, 64) for y in range(0, 192, 64)]  # 5 x 3 cells of 64 px
    dets, gts = [], []
    for _ in range(n_images):
        chosen = rng.permutation(len(cells))[: rng.integers(0, 9)]
        g_boxes, g_labels, i_boxes, i_labels = [], [], [], []
        for k, c in enumerate(chosen):
            x, y = cells[c]
            w, h = rng.uniform(16, 56, size=2)
            box = [x + 4, y + 4, x + 4 + w, y + 4 + h]
            if k == 0 and rng.random() < 0.3:  # a crowd region
                i_boxes.append(box)
                i_labels.append(int(rng.integers(1, 3)))
            else:
                g_boxes.append(box)
                g_labels.append(int(rng.integers(1, 3)))
        d_boxes, d_labels = [], []
        for box, label in zip(g_boxes + i_boxes, g_labels + i_labels):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, found twice
                scale = rng.uniform(0.0, 0.45) * (box[2] - box[0])
                d_boxes.append(np.asarray(box) + rng.normal(0, 1, 4) * scale * 0.5)
                d_labels.append(label if rng.random() < 0.85 else 3 - label)
        for _ in range(rng.integers(0, 4)):  # background false positives, any class
            x, y = rng.uniform(0, 280), rng.uniform(0, 150)
            d_boxes.append([x, y, x + rng.uniform(8, 40), y + rng.uniform(8, 40)])
            d_labels.append(int(rng.integers(1, 4)))
        d_boxes = np.asarray(d_boxes, float).reshape(-1, 4)
        d_boxes[:, 2:] = np.maximum(d_boxes[:, 2:], d_boxes[:, :2] + 1)
        dets.append(det(d_boxes, d_labels, rng.random(len(d_boxes))))
        gts.append(
            gt(
                np.asarray(g_boxes).reshape(-1, 4),
                g_labels,
                ignore_boxes=np.asarray(i_boxes).reshape(-1, 4),
                ignore_labels=i_labels,
            )
        )
    return dets, gts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_ap50_agrees_with_pycocotools_within_one_point(seed):
    # Tolerance 1.0 AP point, from the interpolation alone: both metrics read the same non-increasing
    # precision envelope p(r) on [0, 1] (values in [0, 1]). VOC integrates it exactly; COCO averages it at
    # the 101 recalls i/100. Both lie between sum_{i=1..100} p(i/100)/100 and sum_{i=0..99} p(i/100)/100,
    # which differ by (p(0) - p(1))/100 <= 0.01. The matching is identical by construction (disjoint GT
    # cells, crowd regions only in free cells), so any larger difference is a bug in one of the two.
    names = ["car", "person", "truck"]
    dets, gts = random_split(seed)
    voc = evaluate_detections(dets, gts, names).to_json()
    coco = coco_ap50(dets, gts, names)
    assert voc["AP"]["truck"] is None and coco["AP"]["truck"] is None
    for name in ("car", "person"):
        assert 5.0 < voc["AP"][name] < 95.0  # a non-trivial curve, so the check means something
        assert abs(voc["AP"][name] - coco["AP"][name]) <= 1.0, (name, voc["AP"][name], coco["AP"][name])
    assert abs(voc["mAP"] - coco["mAP"]) <= 1.0


def test_coco_ap50_hand_case_and_no_detections():
    # Same curve as the hand case; COCO's 101-point mean of the envelope: recalls 0..0.33 (34 points)
    # at precision 1, 0.34..0.66 (33 points) at 2/3, the rest 0 -> (34 + 22) / 101 = 55.45.
    dets, gts = hand_case()
    assert coco_ap50(dets, gts, ["car"])["AP"]["car"] == pytest.approx(100 * 56 / 101)
    empty = [det(np.zeros((0, 4)), [], [])] * 2
    assert coco_ap50(empty, gts, ["car", "truck"]) == {"mAP": 0.0, "AP": {"car": 0.0, "truck": None}}


def test_coco_ap50_max_dets_cuts_the_lowest_scored_detections_per_image():
    # one image, two objects; the detector finds both, the right one with the lower score
    gts = [gt([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    dets = [det([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], [1, 1, 1], [0.9, 0.8, 0.7])]
    assert coco_ap50(dets, gts, ["car"])["AP"]["car"] > 50.0  # nothing cut: both objects found
    # detectron2-style cap at 2 per image: the 0.7 detection is cut, recall stops at 0.5 with precision 1/2
    assert coco_ap50(dets, gts, ["car"], max_dets=2)["AP"]["car"] == pytest.approx(100 * 0.5 * 51 / 101)


# --------------------------------------------------------------------------- runner


class FakeDetector(torch.nn.Module):
    """Returns one box per image at its top-left quarter, score = image mean; records how it was called."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.calls = []

    def detect(self, images):
        self.calls.append((len(images), self.training, torch.is_grad_enabled()))
        out = []
        for image in images:
            h, w = image.shape[-2:]
            box = torch.tensor([[0.0, 0.0, w / 2, h / 2]]) * self.weight
            out.append({"boxes": box, "labels": torch.tensor([1]), "scores": image.mean().reshape(1)})
        return out


def test_run_detector_order_modes_and_no_grad():
    dataset = [
        (torch.full((3, 8 + 2 * i, 16), i / 10), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        for i in range(5)
    ]
    detector = FakeDetector().train()
    out = run_detector(detector, dataset, "cpu", batch_size=2, progress=False)
    assert [c[0] for c in detector.calls] == [2, 2, 1]
    assert all(not training and not grad for _, training, grad in detector.calls)
    assert detector.training  # mode restored
    np.testing.assert_allclose([o["scores"][0] for o in out], [0.0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(out[3]["boxes"], [[0, 0, 8, 7]])
    assert isinstance(out[0]["boxes"], np.ndarray)


def test_pr_csv_is_downsampled_and_keeps_the_ends(tmp_path):
    recall = np.linspace(0, 1, 1000)
    precision = 1 - recall**2
    r, p = downsample_curve(recall, precision, 200)
    assert len(r) == 200 and r[0] == 0.0 and r[-1] == 1.0
    np.testing.assert_allclose(p, 1 - r**2)
    path = tmp_path / "pr" / "m.csv"
    write_pr_csv(
        path,
        {
            "car": {"recall": recall, "precision": precision},
            "person": {"recall": recall[:3], "precision": precision[:3]},
        },
    )
    rows = list(csv.DictReader(path.open()))
    assert [sum(r["class"] == c for r in rows) for c in ("car", "person")] == [200, 3]
    assert float(rows[-1]["precision"]) == pytest.approx(precision[2])


# --------------------------------------------------------------------------- evaluate stage, end to end


def tiny_split(folder, classes=("car", "person", "truck")):
    """3 images 96x64 with 2 cars, 1 person and one crowd region of trucks (written like the data layer)."""
    from PIL import Image

    from vspa.data.coco import write_coco

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    images = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / "images" / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"images/{i:06d}.png", "width": 96, "height": 64})
    anns = [
        (0, 1, [4, 4, 20, 20], 0),
        (1, 1, [30, 10, 30, 20], 0),
        (1, 2, [70, 5, 10, 30], 0),
        (2, 3, [0, 0, 40, 40], 1),
    ]
    annotations = [
        {"id": k, "image_id": im, "category_id": cat, "bbox": box, "area": float(box[2] * box[3]), "iscrowd": crowd}
        for k, (im, cat, box, crowd) in enumerate(anns)
    ]
    categories = [{"id": k, "name": n} for k, n in enumerate(classes, start=1)]
    write_coco(folder / "annotations.json", images, annotations, categories, info={"split": "test"})


def tiny_checkpoint(path, classes):
    from conftest import detector_config

    from vspa.detection.checkpoint import save
    from vspa.detection.model import build_detector

    torch.manual_seed(0)
    cfg = detector_config(min_size=64, max_size=96, small_width=8)
    save(path, build_detector(cfg, len(classes)), cfg, list(classes))


def run_evaluate_stage(tmp_path, model, monkeypatch):
    """Run stages/evaluate.py's command in this process (the CLI itself is exercised by the dvc e2e test)."""
    from pathlib import Path

    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  device: cpu\n  iou: 0.5\n  batch_size: 2\n")
    monkeypatch.chdir(tmp_path)  # the output folders (those of dvc.yaml) are relative to the project root
    stage_main("evaluate")(
        params=str(params),
        model=model,
        data=tmp_path / "split",
        name="tiny",
        metrics_dir=Path("reports/metrics"),
        plots_dir=Path("reports/plots/pr"),
    )


def test_evaluate_stage_end_to_end(tmp_path, monkeypatch, capsys):
    from vspa.evaluation.runner import evaluate_model

    tiny_split(tmp_path / "split")
    tiny_checkpoint(tmp_path / "model.pt", ["car", "person", "truck"])
    run_evaluate_stage(tmp_path, tmp_path / "model.pt", monkeypatch)
    assert "tiny: mAP@0.5 " in capsys.readouterr().out
    metrics = json.loads((tmp_path / "reports" / "metrics" / "tiny.json").read_text())
    info = json.loads((tmp_path / "reports" / "metrics" / "info" / "tiny.json").read_text())
    assert list(metrics) == ["mAP", "AP", "coco_mAP50", "coco_AP50"]  # the DVC metrics file: AP figures only
    assert info["num_images"] == 3 and info["name"] == "tiny"
    assert info["num_gt"] == {"car": 2, "person": 1, "truck": 0}  # the crowd region is not a GT
    assert metrics["AP"]["truck"] is None and all(0.0 <= metrics["AP"][c] <= 100.0 for c in ("car", "person"))
    # the stage's numbers are those of the library on the same checkpoint (inference is deterministic on CPU)
    again, curves = evaluate_model(tmp_path / "model.pt", tmp_path / "split", "cpu", batch_size=3, progress=False)
    assert again["AP"] == metrics["AP"] and again["num_det"] == info["num_det"]
    rows = list(csv.DictReader((tmp_path / "reports" / "plots" / "pr" / "tiny.csv").open()))
    assert sum(r["class"] == "car" for r in rows) == min(200, len(curves["car"]["recall"]))
    assert set(rows[0]) == {"class", "recall", "precision"}


def test_evaluate_stage_refuses_other_classes(tmp_path, monkeypatch, capsys):
    tiny_split(tmp_path / "split")
    tiny_checkpoint(tmp_path / "model.pt", ["car", "person"])
    with pytest.raises(SystemExit) as exit_info:
        run_evaluate_stage(tmp_path, tmp_path / "model.pt", monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.pt was trained on classes ['car', 'person']" in err
    assert "annotations.json has categories ['car', 'person', 'truck']" in err
    assert not (tmp_path / "reports").exists()  # nothing half written
