"""benchmarks/translator_budget.py: the decision rule and the convergence figure, on hand-made numbers."""

from __future__ import annotations

import pytest

from loaders import load_script

budget = load_script("benchmarks/translator_budget.py")


def _runs(values: dict[str, list[float]]) -> list[dict]:
    return [
        {"name": n, "seed": s, "val_mAP": v, "train_seconds": 100.0, "nce_tail_change": -0.01}
        for n, vs in values.items()
        for s, v in enumerate(vs)
    ]


def test_the_best_mean_replaces_the_default_only_when_its_difference_is_shown():
    names = ["default_1000", "const80_1000", "const80_3000"]
    # const80_3000 has the best mean, but its per-seed differences (+5, -1, +5) do not exclude 0 at 3 seeds
    noisy = budget.summarise(_runs({"default_1000": [30, 32, 34], "const80_1000": [31, 33, 35],
                                    "const80_3000": [35, 31, 39]}), names)  # fmt: skip
    assert noisy["best_mean"] == "const80_3000" and noisy["chosen"] == "default_1000"
    assert noisy["rows"]["const80_3000"]["vs_reference"]["verdict"] == "not shown"
    # a consistent gain (+2.0, +2.1, +1.9) is shown: that candidate is chosen
    steady = budget.summarise(_runs({"default_1000": [30, 32, 34], "const80_1000": [32, 34.1, 35.9]}), names[:2])
    assert steady["chosen"] == "const80_1000"
    assert steady["rows"]["const80_1000"]["vs_reference"]["mean"] == pytest.approx(2.0)
    # a shown loss never replaces the default
    worse = budget.summarise(_runs({"default_1000": [30, 32, 34], "const80_1000": [28, 30.1, 31.9]}), names[:2])
    assert worse["best_mean"] == "default_1000" and worse["chosen"] == "default_1000"


def test_nce_tail_compares_the_last_tenth_with_the_tenth_before(tmp_path):
    path = tmp_path / "losses.csv"
    values = [10.0] * 80 + [4.0] * 10 + [3.0] * 10  # 100 iterations: 80-90% at 4, 90-100% at 3
    path.write_text("iteration,loss_NCE\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(values)))
    tail = budget.nce_tail(path)
    assert (tail["nce_80_90"], tail["nce_90_100"]) == (4.0, 3.0)
    assert tail["nce_tail_change"] == pytest.approx(-0.25)


def test_markdown_names_the_choice():
    names = ["default_1000", "const80_1000"]
    text = budget.markdown(budget.summarise(_runs({"default_1000": [30, 32], "const80_1000": [31, 31]}), names),
                           "attention_lg", [0, 1])  # fmt: skip
    assert "Chosen by the rule: **default_1000**" in text and "| const80_1000:" in text
