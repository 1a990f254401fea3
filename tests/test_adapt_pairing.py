"""``fg_mode: pairing`` in the adaptation trainer (AugSim -> FoggyAugSim on the tiny benchmark)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import DiesAfter, Killed, adapt_config, untrained_source_and_memory

from vspa.adaptation import data as data_module
from vspa.adaptation import step as step_module
from vspa.adaptation.pairing import PairingBank, differing_attributes
from vspa.adaptation.trainer import (
    AdaptConfig,
    AdaptData,
    adapt,
    build_pairing_table,
    input_fingerprint,
)
from vspa.data.augsim import VARIANT_FLAGS, variant_from_flags
from vspa.utils import VspaError

TINY_MODEL = dict(backbone="small", small_width=8, min_size=64, max_size=128, anchor_sizes=[16, 32, 64])
NAMED = {"exact": set(), "color": {"color"}, "flip": {"flip"}, "color_flip": {"color", "flip"}}


@pytest.fixture(scope="module")
def pairing_inputs(tiny_benchmark, tmp_path_factory):
    """AugSim source (half the images changed), its variant sets, FoggyAugSim target, an untrained tiny
    detector and the memory of the AugSim source."""
    from vspa.data.augsim import make_augsim, make_foggy, make_variant_set

    root = tmp_path_factory.mktemp("adapt_pairing")
    original = Path(tiny_benchmark) / "source_train"
    make_augsim(original, root / "augsim", fraction=0.5, seed=0)
    for variant in ("color", "flip", "color_flip"):
        make_variant_set(original, root / "pairing" / variant, variant)
    make_foggy(root / "augsim", root / "foggy", beta=0.04, airlight=0.8)
    untrained_source_and_memory(root / "augsim" / "annotations.json", root, TINY_MODEL, "random", 1.0)
    return {
        "root": root,
        "original": original,
        "variants": root / "pairing",
        "source": root / "augsim",
        "target": root / "foggy",
        "model": root / "source.pt",
        "memory": root / "memory.h5",
    }


def pairing_cfg(inputs, **over) -> AdaptConfig:
    values = dict(
        iterations=2,
        batch_size=2,
        lr=0.01,
        tau=0.0,
        ema_keep=0.9,
        device="cpu",
        checkpoint_every=2,
        refresh_every=0,
        lambda_img=0.0,
        bg_mode="off",
        source_strong=False,
        fg_mode="pairing",
        pairing_original=str(inputs["original"]),
        pairing_variants=str(inputs["variants"]),
    )
    return adapt_config(**{**values, **over})


def make_data(inputs, cfg: AdaptConfig, target=None) -> AdaptData:
    from vspa.data.coco import DetectionDataset

    src_json, tgt_json = inputs["source"] / "annotations.json", inputs["target"] / "annotations.json"
    return AdaptData(
        DetectionDataset(src_json),
        target if target is not None else DetectionDataset(tgt_json),
        inputs["memory"],
        input_fingerprint(inputs["model"], src_json, tgt_json, inputs["memory"]),
        pairing_table=build_pairing_table(cfg, inputs["target"]),
    )


def run_pairing(inputs, work: Path, target=None, **over):
    from vspa.detection import checkpoint

    cfg = pairing_cfg(inputs, **over)
    student, _ = checkpoint.load(inputs["model"])
    torch.manual_seed(cfg.seed)
    teacher, summary = adapt(student, make_data(inputs, cfg, target), cfg, work, work / "losses.csv", progress=False)
    return student, teacher, summary


def read_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- config


def test_pairing_config_errors_name_the_param_and_the_fix(pairing_inputs, tmp_path):
    base = {"iterations": 2, "batch_size": 2, "lr": 0.01, "fg_mode": "pairing"}
    with pytest.raises(VspaError, match=r"adapt\.pairing_original is not set.*data/benchmark/source_train.*augsim"):
        adapt_config(**base, pairing_variants="x")
    with pytest.raises(VspaError, match=r"adapt\.pairing_variants is not set.*data/augsim/pairing"):
        adapt_config(**base, pairing_original="x")
    with pytest.raises(VspaError, match="pairing_mode must be one of exact, color, flip, color_flip"):
        adapt_config(**base, pairing_original="x", pairing_variants="y", pairing_mode="rot")
    cfg = adapt_config(**base, pairing_original=str(tmp_path / "absent"), pairing_variants="y")
    assert cfg.needs_memory and cfg.use_pairing and cfg.pairing_mode == "exact"
    with pytest.raises(VspaError, match=r"adapt\.pairing_original = '.*absent' is not a folder.*dvc repro augsim"):
        build_pairing_table(cfg, pairing_inputs["target"])
    # without fg_mode pairing the paths are not needed, and the record (resume fingerprint, checkpoint meta)
    # of the other modes does not carry the pairing keys
    memory = adapt_config(iterations=2, batch_size=2, lr=0.01)
    assert not memory.use_pairing and not any(k.startswith("pairing_") for k in memory.record())
    assert cfg.record()["pairing_original"] == str(tmp_path / "absent")


def test_pairing_needs_the_table(pairing_inputs, tmp_path):
    from vspa.detection import checkpoint

    cfg = pairing_cfg(pairing_inputs)
    data = make_data(pairing_inputs, cfg)
    data.pairing_table = None
    student, _ = checkpoint.load(pairing_inputs["model"])
    with pytest.raises(VspaError, match="fg_mode pairing needs the pair table"):
        adapt(student, data, cfg, tmp_path, tmp_path / "losses.csv", progress=False)


# --------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("mode", ["exact", "color_flip"])
def test_pairing_run_has_finite_losses_and_pairs(pairing_inputs, tmp_path, mode):
    torch.set_num_threads(1)
    _, _, summary = run_pairing(pairing_inputs, tmp_path, pairing_mode=mode)
    rows = read_rows(tmp_path / "losses.csv")
    assert len(rows) == 2
    for row in rows:
        assert all(math.isfinite(float(row[k])) for k in ("loss_sup", "loss_unsup", "loss_fg", "total"))
        assert float(row["fg_pairs"]) > 0 and float(row["loss_fg"]) > 0
    assert summary["fg_mode"] == "pairing" and summary["pairing_mode"] == mode
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["pairing"]["mode"] == mode
    assert state["pairing"]["features"].shape[:2] == (2, len(state["pairing"]["object_ids"]))


def test_positives_are_the_bank_entries_of_the_promised_counterpart(pairing_inputs, tmp_path, monkeypatch):
    """In an iteration, each anchor's positive is the bank row of its matched object and mirror state, and
    that row's counterpart differs from the object as the student sees it in exactly the mode's attributes."""
    torch.set_num_threads(1)
    calls = []
    original = step_module.pairing_triplets

    def spy(bank, retriever, anchors, labels, object_ids, mirrored, generator):
        triplets = original(bank, retriever, anchors, labels, object_ids, mirrored, generator)
        calls.append((bank, object_ids.clone(), mirrored.clone(), triplets.positive.detach().clone()))
        return triplets

    monkeypatch.setattr(step_module, "pairing_triplets", spy)  # looked up by StudentStep in step.py
    mode = "color"
    cfg = pairing_cfg(pairing_inputs, iterations=1, pairing_mode=mode)
    data = make_data(pairing_inputs, cfg)
    from vspa.detection import checkpoint

    student, _ = checkpoint.load(pairing_inputs["model"])
    reference = PairingBank.extract(student, data.pairing_table, mode, progress=False)  # before any step
    torch.manual_seed(cfg.seed)
    adapt(student, data, cfg, tmp_path, tmp_path / "losses.csv", progress=False)
    assert len(calls) == 1
    bank, object_ids, mirrored, positive = calls[0]
    assert torch.allclose(bank.features, reference.features, atol=1e-6)  # embedded with the source model
    found = object_ids >= 0
    assert found.any() and len(positive) == int(found.sum())
    # the weak views of iteration 0: which objects each image holds and whether it was mirrored
    *_, pairs = data_module._batch(data, cfg, 0, range(cfg.batch_size), torch.device("cpu"))
    flipped_of = {int(o): p["flipped"] for p in pairs for o in p["object_ids"]}
    table = data.pairing_table
    index = {int(o): i for i, o in enumerate(reference.object_ids)}
    for oid, mirror, vector in zip(object_ids[found].tolist(), mirrored[found].tolist(), positive):
        assert mirror == flipped_of[oid]  # the anchor's object is in the batch, with its image's mirror flag
        assert torch.equal(vector, bank.features[int(mirror), index[oid]])
        (row,) = table.counterpart([oid], mode, mirror)
        color, flip = VARIANT_FLAGS[table.target_variant[oid]]
        seen = variant_from_flags(color, flip != mirror)
        assert differing_attributes(seen, row.variant) == NAMED[mode]
    row = read_rows(tmp_path / "losses.csv")[0]
    assert float(row["fg_pairs"]) == int(found.sum()) and math.isfinite(float(row["loss_fg"]))


def test_resume_restores_the_refreshed_pairing_bank(pairing_inputs, tmp_path):
    """The bank is re-embedded at the memory refresh, saved in the state, and a killed run resumes to the
    same weights as an uninterrupted one."""
    from vspa.data.coco import DetectionDataset
    from vspa.detection import checkpoint

    torch.set_num_threads(1)
    over = dict(iterations=3, refresh_every=2, bg_mode="memory", pairing_mode="flip")
    s_ref, t_ref, summary = run_pairing(pairing_inputs, tmp_path / "ref", **over)
    assert summary["refreshes"] == 1

    target = DetectionDataset(pairing_inputs["target"] / "annotations.json")
    with pytest.raises(Killed):  # killed in iteration 3 (2 target images per iteration)
        run_pairing(pairing_inputs, tmp_path / "killed", target=DiesAfter(target, calls=5), **over)
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert state["iteration"] == 2 and state["pairing"]["mode"] == "flip"
    # the bank in the state is the one embedded at the refresh by the student of iteration 2
    student, _ = checkpoint.load(pairing_inputs["model"])
    student.load_state_dict({k[len("detector.") :]: v for k, v in state["step"].items() if k.startswith("detector.")})
    cfg = pairing_cfg(pairing_inputs, **over)
    table = build_pairing_table(cfg, pairing_inputs["target"])
    refreshed = PairingBank.extract(student, table, "flip", progress=False)
    assert torch.allclose(state["pairing"]["features"], refreshed.features, atol=1e-6)
    initial = PairingBank.extract(checkpoint.load(pairing_inputs["model"])[0], table, "flip", progress=False)
    assert not torch.allclose(state["pairing"]["features"], initial.features, atol=1e-4)

    s_res, t_res, _ = run_pairing(pairing_inputs, tmp_path / "killed", **over)
    for ref, res in ((s_ref, s_res), (t_ref, t_res)):
        a, b = ref.state_dict(), res.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("iteration", "loss_fg", "fg_pairs", "total")
    rows_ref, rows_res = read_rows(tmp_path / "ref" / "losses.csv"), read_rows(tmp_path / "killed" / "losses.csv")
    assert [[r[k] for k in keys] for r in rows_res] == [[r[k] for k in keys] for r in rows_ref]
