"""params.yaml is Hydra's composition of conf/ (as `dvc exp run -S` writes it): no drift, no preset nulls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from vspa.config import available_scenarios, compose, dump_params, effective_params

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# keys whose null is a value ("not given"), not a placeholder for a scenario's value
OPTIONAL_NULLS = {"model.pretrained_weights"} | {
    f"prepare.coco.{s}.{k}"
    for s in ("source_train", "source_test", "target_train", "target_test")
    for k in ("json", "images")
}


def nulls(tree, path=""):
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in nulls(v, f"{path}.{k}" if path else k)]
    return [path] if tree is None else []


def test_committed_params_are_the_default_composition():
    assert (ROOT / "params.yaml").read_text() == dump_params(compose(CONF)), (
        "params.yaml is not the composition of conf/: run `make params` after editing conf/ or a scenario file."
    )


def test_dvc_writes_the_same_file(tmp_path):
    """DVC's own compose_and_dump (what `dvc exp run -S` calls) gives the committed file byte for byte."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(tmp_path / "params.yaml", str(CONF), None, "config", str(ROOT), [])
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    assert "enabled = true" in (ROOT / ".dvc" / "config").read_text().split("[hydra]")[1]


@pytest.mark.parametrize("scenario", available_scenarios())
def test_every_scenario_sets_every_placeholder(scenario):
    params = compose(CONF, [f"scenario={scenario}"])
    assert params["scenario"] == scenario
    assert set(nulls(params)) <= OPTIONAL_NULLS, f"conf/scenario/{scenario}.yaml leaves these null"
    # the same values the run-time preset overlay gave the old null-style params.yaml
    assert effective_params({**params}) == params


def test_scenario_and_key_overrides_compose_together():
    params = compose(CONF, ["scenario=sim10k_cityscapes", "adapt.tau=0.6"])
    assert params["adapt"]["tau"] == 0.6
    assert params["model"]["backbone"] == "resnet101" and params["adapt"]["lambda_fg"] == 0.05
    assert params["prepare"]["source"] == "import" and params["prepare"]["classes"] == ["car"]
    default = compose(CONF)
    assert default["model"]["backbone"] == "small" and default["adapt"]["tau"] == 0.8
    # a scenario's value wins over the shared one, an override over both
    assert compose(CONF, ["scenario=synth_fog", "adapt.iterations=7"])["adapt"]["iterations"] == 7


def test_translate_paper_size_is_a_group_option_that_composes_with_scenario_and_keys():
    from vspa.translation.config import TranslateConfig

    default = compose(CONF)["translate"]
    paper = compose(CONF, ["scenario=cityscapes_foggy", "translate=paper", "translate.iterations=5000"])
    assert paper["scenario"] == "cityscapes_foggy" and paper["model"]["backbone"] == "vgg16"
    t = paper["translate"]
    assert (t["ngf"], t["n_blocks"], t["ndf"], t["queue_size"], t["lr"]) == (64, 9, 64, 4096, 1e-5)
    assert t["iterations"] == 5000 and (t["crop_height"], t["crop_width"]) == (256, 512)
    assert t["lambda_ga"] == default["lambda_ga"] and t.keys() == default.keys()  # only sizes change
    assert (default["ngf"], default["n_blocks"]) == (16, 2)  # the committed CPU budget is not the paper's
    TranslateConfig.from_params(t)  # valid as a whole


def test_unknown_scenario_is_a_clear_error():
    from vspa.utils import VspaError

    with pytest.raises(VspaError, match=r"composing with \['scenario=nope'\] failed"):
        compose(CONF, ["scenario=nope"])


def test_params_command_checks_and_writes(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cli = [sys.executable, "-m", "vspa.cli", "params", "--conf", str(CONF)]
    out = tmp_path / "p.yaml"
    assert subprocess.run(cli + ["--out", str(out), "--check"], env=env, capture_output=True).returncode != 0
    subprocess.run(cli + ["scenario=voc_comic2k", "--out", str(out)], env=env, check=True, capture_output=True)
    assert yaml.safe_load(out.read_text())["model"]["backbone"] == "resnet101"
    proc = subprocess.run(cli + ["--out", str(out), "--check"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "make params" in proc.stderr + proc.stdout
