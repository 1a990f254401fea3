"""The params/preset overlay and the atomic-output helpers."""

from __future__ import annotations

import pytest
import yaml

from vspa.config import available_scenarios, effective_params, stage_config
from vspa.utils import VspaError, atomic_path, save_torch_atomic, write_json_atomic


def test_null_takes_the_preset_value_and_a_given_value_wins():
    params = {"scenario": "synth_fog", "model": {"backbone": None, "min_size": 96}, "pretrain": {"lr": None}}
    merged = effective_params(params)
    assert merged["model"]["backbone"] == "small"  # from the preset
    assert merged["model"]["min_size"] == 96  # given in params wins over the preset's 160
    assert merged["model"]["max_size"] == 320  # only in the preset
    assert merged["pretrain"]["lr"] == 0.02


def test_unknown_scenario_names_the_choices():
    with pytest.raises(VspaError, match="unknown scenario 'nope'.*synth_fog"):
        effective_params({"scenario": "nope"})


def test_stage_config_reads_a_file_and_reports_a_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"scenario": "synth_real", "model": {"backbone": None}}))
    cfg = stage_config(str(path), "model")
    assert cfg["scenario"] == "synth_real" and cfg["model"]["backbone"] == "small"
    with pytest.raises(VspaError, match=r"params.yaml: missing section 'evaluate:'"):
        stage_config(str(path), "evaluate")


def test_every_preset_parses_to_a_mapping():
    names = available_scenarios()
    assert {"synth_fog", "synth_real"} <= set(names)
    for name in names:
        assert isinstance(effective_params({"scenario": name}), dict)


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"mAP": 1.0})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith('{\n  "mAP": 1.0')
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_output_gets_ordinary_permissions(tmp_path):
    import os

    target = tmp_path / "a.json"
    write_json_atomic(target, {})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_the_same_checkpoint_twice_gives_the_same_bytes(tmp_path):
    # DVC hashes the file: identical weights must give an identical file, whatever the temp file was called.
    import torch

    state = {"weights": torch.arange(12.0).reshape(3, 4), "meta": {"stage": "pretrain"}}
    save_torch_atomic(state, tmp_path / "a.pt")
    save_torch_atomic(state, tmp_path / "b" / "model.pt")
    save_torch_atomic(state, tmp_path / "a.pt")  # over an existing file
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt")["weights"], state["weights"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
