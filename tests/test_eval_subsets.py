"""evaluate.subsets: a subset of a split's images is scored on its own, from the same detections."""

import numpy as np
import pytest

from vspa.evaluation.runner import score, subset_indices
from vspa.utils import VspaError

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
    gts = [{"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1])},
           {"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1])}]
    dets = [{"boxes": np.array([[0, 0, 10, 10]], float), "labels": np.array([1]), "scores": np.array([0.5])},
            {"boxes": np.array([[50, 50, 60, 60]], float), "labels": np.array([1]), "scores": np.array([0.9])}]
    whole, _ = score(dets, gts, ["car"], 0.5)
    only0, _ = score(dets[:1], gts[:1], ["car"], 0.5)
    assert only0["mAP"] == pytest.approx(100.0)
    # both images: ranked FP (0.9) then TP (0.5): recall 0.5 at precision 0.5 -> all-point AP 25
    assert whole["mAP"] == pytest.approx(25.0)
    assert only0["num_images"] == 1 and whole["num_images"] == 2
