"""The plumbing shared by the training loops (vspa.training): seed streams, schedule, state file, loss log,
divergence check. The pinned numbers were computed with the loops' own code before it moved here: a change
of them changes every training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import adapt_config, default_section, detector_config, train_config

from vspa.adaptation.config import AdaptConfig
from vspa.detection import train as detection_train
from vspa.detection.train import TrainConfig
from vspa.training import schedule, seeds
from vspa.training.guard import check_finite
from vspa.training.log import csv_text, write_log
from vspa.training.state import load_state, save_state
from vspa.utils import VspaError

FMT = "vspa-test-state/1"

# --------------------------------------------------------------------------- seed streams


def test_derive_seed_and_global_batch_keep_their_numbers():
    assert seeds.derive_seed(0) == 6375474604893067239
    assert seeds.derive_seed(7, 3, 1) == 2278053489433120505
    assert seeds.derive_seed(1, 2, 3, 4) == 9130766517534196204
    assert seeds.derive_seed(123456789, 0, 2) == 8530287139115780413
    assert seeds.global_batch(5, 2, 7, 0) == [0, 1]
    assert seeds.global_batch(5, 2, 7, 2) == [4, 3]
    assert seeds.global_batch(10, 4, 0, 3) == [4, 5, 7, 1]
    assert seeds.global_batch(3, 4, 1, 5) == [2, 0, 1, 2]  # straddles epochs 6 and 7


def test_old_import_paths_are_the_shared_functions():
    assert detection_train.derive_seed is seeds.derive_seed
    assert detection_train.global_batch is seeds.global_batch
    assert detection_train.WARMUP_FACTOR == schedule.WARMUP_FACTOR == 0.001


# --------------------------------------------------------------------------- schedule


def test_lr_factor_warms_up_then_steps_exactly_as_before():
    cfg = train_config(iterations=100, batch_size=2, lr=0.01, warmup_iters=10, lr_steps=[20, 50])
    expected = {
        0: 0.001,
        5: 0.5005,
        9: 0.9001,
        10: 1.0,
        19: 1.0,
        20: 0.1,
        49: 0.1,
        50: 0.010000000000000002,
        99: 0.010000000000000002,
    }
    assert {i: cfg.lr_factor(i) for i in expected} == expected  # exact floats: the lr is in the loss log
    assert {i: schedule.lr_factor(i, 10, [20, 50]) for i in expected} == expected
    adapt = adapt_config(iterations=100, batch_size=2, lr=0.01, warmup_iters=4)
    assert [adapt.lr_factor(i) for i in range(6)] == [0.001, 0.25075, 0.5005, 0.75025, 1.0, 1.0]
    assert schedule.lr_factor(0, 0) == 1.0 and schedule.lr_factor(3, 0, [3]) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("key", "bad", "requirement"),
    [
        ("iterations", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("lr", float("inf"), "a positive number"),
        ("momentum", 1.0, "in [0, 1)"),
        ("weight_decay", -0.1, ">= 0"),
        ("warmup_iters", -1, ">= 0"),
        ("checkpoint_every", 0, ">= 1"),
    ],
)
def test_both_loops_check_the_sgd_keys_alike(key, bad, requirement):
    """schedule.sgd_checks: one set of checks for pretrain / oracle and adapt, with the messages they had."""
    for cls, name in ((TrainConfig, "oracle"), (AdaptConfig, "adapt")):
        with pytest.raises(VspaError) as exc:
            cls.from_params({**default_section(name), key: bad}, name=name, path="p.yaml")
        assert str(exc.value) == f"p.yaml: {name}.{key} must be {requirement}, got {bad!r}."
    keys = [key for _, key, _ in schedule.sgd_checks(train_config())]
    assert keys == ["iterations", "batch_size", "lr", "momentum", "weight_decay", "warmup_iters", "checkpoint_every"]


def test_sgd_with_schedule_applies_the_factor_per_step():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer, scheduler = schedule.sgd_with_schedule([weight], 0.5, 0.9, 1e-4, lambda i: schedule.lr_factor(i, 2, [3]))
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    lrs = []
    for _ in range(4):
        lrs.append(group["lr"])
        weight.sum().backward()
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5 * 0.001, 0.5 * 0.5005, 0.5, 0.05])


# --------------------------------------------------------------------------- state file


def state_payload() -> dict:
    return {"model": {"w": torch.arange(3.0)}, "rows": [{"iteration": 1, "lr": 0.1}]}


def test_a_matching_state_is_returned_and_a_missing_one_is_silently_none(tmp_path, capsys):
    path = tmp_path / "work" / "last.pt"
    assert load_state(path, FMT, "abc", "t") is None
    assert capsys.readouterr().err == ""
    save_state(path, FMT, "abc", 7, state_payload())
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left
    state = load_state(path, FMT, "abc", "t")
    assert list(state) == ["format", "fingerprint", "iteration", "model", "rows"]
    assert state["iteration"] == 7 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("fingerprint", "written with a different configuration"),
        ("format", "not a vspa-test-state/1 state (found 'vspa-other-state/1')"),
        ("not_a_dict", "not a vspa-test-state/1 state (found 'Tensor')"),
        ("truncated", "unreadable ("),
        ("text", "unreadable ("),
    ],
)
def test_a_foreign_or_unreadable_state_means_starting_over_with_a_message(tmp_path, capsys, make, reason):
    path = tmp_path / "last.pt"
    if make == "fingerprint":
        save_state(path, FMT, "other", 3, state_payload())
    elif make == "format":
        save_state(path, "vspa-other-state/1", "abc", 3, state_payload())
    elif make == "not_a_dict":
        torch.save(torch.zeros(2), path)
    elif make == "truncated":
        save_state(path, FMT, "abc", 3, state_payload())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("not a state")
    assert load_state(path, FMT, "abc", "t") is None
    err = capsys.readouterr().err
    assert err.startswith(f"[t] {path}: ") and reason in err and "starting from iteration 0" in err


def test_weights_only_false_reads_states_with_rng_tuples(tmp_path, capsys):
    path = tmp_path / "last.pt"
    save_state(path, FMT, "abc", 1, {"rng": np.random.get_state()})
    assert load_state(path, FMT, "abc", "t", weights_only=False)["rng"][0] == "MT19937"
    assert load_state(path, FMT, "abc", "t") is None and "unreadable" in capsys.readouterr().err


def test_detector_training_starts_over_from_an_unreadable_state_and_overwrites_it(tmp_path, capsys):
    from test_train import TinyDataset, fresh_detector, train_cfg

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "last.pt").write_bytes(b"\x00garbage")
    cfg = train_cfg(iterations=1, warmup_iters=0, lr_steps=[])
    train_detector = detection_train.train_detector
    train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "work", tmp_path / "l.csv", progress=False)
    assert "unreadable" in capsys.readouterr().err
    assert load_state(tmp_path / "work" / "last.pt", detection_train.STATE_FORMAT, "x", "t") is None  # rewritten:
    assert "different configuration" in capsys.readouterr().err  # a readable train state, only another fingerprint


# --------------------------------------------------------------------------- loss log and divergence check


def test_loss_log_format(tmp_path):
    rows = [{"iteration": 1.0, "lr": 1e-5, "loss": 0.123456789, "extra": 1}, {"iteration": 2, "lr": 0.01, "loss": 2}]
    assert csv_text(rows, ("iteration", "lr", "loss")) == "iteration,lr,loss\n1,1e-05,0.123457\n2,0.01,2\n"
    assert csv_text([], ("iteration", "loss")) == "iteration,loss\n"
    write_log(tmp_path / "logs" / "l.csv", rows, ("iteration", "loss"))
    assert (tmp_path / "logs" / "l.csv").read_text() == "iteration,loss\n1,0.123457\n2,2\n"
    with pytest.raises(KeyError):
        csv_text([{"iteration": 1}], ("iteration", "loss"))


def test_check_finite_names_the_iteration_every_value_and_the_fix():
    check_finite({"a": 1.0, "total": 2.0}, 3, "training", "Lower lr.")
    with pytest.raises(VspaError) as info:
        check_finite({"a": float("nan"), "total": 2.5}, 4, "training", "Lower lr.")
    assert str(info.value) == "training diverged at iteration 4: non-finite loss (a=nan, total=2.5). Lower lr."
    with pytest.raises(VspaError, match=r"adaptation diverged at iteration 1: .*total=inf"):
        check_finite({"a": 1.0, "total": float("inf")}, 1, "adaptation", "x", keys=["total"])
    check_finite({"diag": float("nan"), "total": 1.0}, 1, "adaptation", "x", keys=["total"])  # only the keys checked


def test_a_state_written_by_other_code_is_not_resumed(monkeypatch):
    """The package's source is part of the resume fingerprint: after a code change, dvc repro retrains
    instead of "resuming" the previous, completed run and writing its weights again."""
    from vspa.detection import train as train_module
    from vspa.detection.model import build_detector
    from vspa.training import state as state_module

    digest = state_module.code_digest()
    assert len(digest) == 64 and digest == state_module.code_digest()
    cfg = train_config(iterations=1, batch_size=1, lr=0.1)
    detector = build_detector(detector_config(), 3)
    before = train_module._fingerprint(cfg, detector, "data")
    monkeypatch.setattr(state_module, "code_digest", lambda: "0" * 64)
    assert train_module._fingerprint(cfg, detector, "data") != before
