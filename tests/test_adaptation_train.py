"""Adaptation: retrieval pairs, config, resume-after-kill, the stage end to end, two processes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import DiesAfter, Killed, adapt_config, default_section, untrained_source_and_memory

from vspa.adaptation.align import (
    ForegroundAligner,
    SourceInstances,
    background_loss,
    class_prototypes,
    inbatch_triplets,
    memory_triplets,
)
from vspa.adaptation.losses import FeatureDiscriminator
from vspa.adaptation.trainer import AdaptConfig, AdaptData, adapt, input_fingerprint
from vspa.memory.retrieval import Retriever
from vspa.memory.store import MemoryBank
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(
    backbone="small", small_width=8, min_size=64, max_size=128, anchor_sizes=[16, 32, 64], box_detections_per_img=8
)


def make_bank(labels: list[int], num_classes: int, dim: int = 16, n_bg: int = 5, seed: int = 0) -> MemoryBank:
    rng = np.random.default_rng(seed)
    n = len(labels)
    return MemoryBank(
        fg_features=rng.random((n, dim), dtype=np.float32),
        fg_labels=np.asarray(labels, dtype=np.int64),
        fg_image_ids=np.arange(n, dtype=np.int64),
        fg_object_ids=np.arange(n, dtype=np.int64),
        fg_boxes=np.zeros((n, 4), dtype=np.float32),
        bg_features=rng.random((n_bg, dim), dtype=np.float32) + 5.0 * np.eye(n_bg, dim, dtype=np.float32),
        bg_image_ids=np.arange(n_bg, dtype=np.int64),
        attrs={"class_names": [f"c{i}" for i in range(1, num_classes + 1)]},
    )


def row_of(vectors: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """Which row of ``table`` each (normalised) vector is."""
    sims = vectors @ F.normalize(torch.as_tensor(table), dim=1).T
    assert torch.allclose(sims.max(dim=1).values, torch.ones(len(vectors)), atol=1e-5)
    return sims.argmax(dim=1)


# --------------------------------------------------------------------------- retrieval pairs


def test_memory_positive_is_most_similar_same_class_entry():
    bank = make_bank([1, 1, 2, 2, 3], 3)
    feats = F.normalize(torch.as_tensor(bank.fg_features), dim=1)
    # anchors: exactly the class-2 row 3, and a mix of rows 0 (class 1) and 2 (class 2), labelled class 1
    anchors = torch.stack([feats[3], feats[0] + feats[2]])
    labels = torch.tensor([2, 1])
    t = memory_triplets(Retriever(bank), anchors, labels, 1, torch.Generator().manual_seed(0))
    assert row_of(t.positive, bank.fg_features).tolist() == [3, 0]
    assert torch.equal(t.anchor, anchors)
    # top-2 pairs each anchor with both of its class's entries, best first
    t2 = memory_triplets(Retriever(bank), anchors, labels, 2, torch.Generator().manual_seed(0))
    assert row_of(t2.positive, bank.fg_features).tolist() == [3, 2, 0, 1]
    assert torch.equal(t2.anchor, anchors.repeat_interleave(2, dim=0))


def test_memory_negative_is_never_of_the_positive_class():
    labels = [1] * 7 + [2] * 3 + [3] * 10
    bank = make_bank(labels, 3, seed=1)
    retriever = Retriever(bank)
    g = torch.Generator().manual_seed(0)
    anchor_labels = torch.randint(1, 4, (2000,), generator=g)
    anchors = torch.randn(2000, 16, generator=g)
    t = memory_triplets(retriever, anchors, anchor_labels, 1, g)
    pos_class = bank.fg_labels[row_of(t.positive, bank.fg_features).numpy()]
    neg_class = bank.fg_labels[row_of(t.negative, bank.fg_features).numpy()]
    assert (pos_class == anchor_labels.numpy()).all()
    assert (neg_class != pos_class).all()
    assert len(np.unique(row_of(t.negative, bank.fg_features).numpy())) == len(labels)  # every entry gets drawn


def test_single_class_negatives_come_from_the_background_memory():
    bank = make_bank([1, 1, 1], 1)
    t = memory_triplets(
        Retriever(bank), torch.randn(50, 16), torch.ones(50, dtype=torch.long), 1, torch.Generator().manual_seed(0)
    )
    rows = row_of(t.negative, bank.bg_features)
    assert len(rows.unique()) > 1
    aligner = ForegroundAligner("prototype")
    aligner.set_memory(bank, "cpu")
    tp = aligner.triplets(
        torch.randn(20, 16), torch.ones(20, dtype=torch.long), torch.Generator().manual_seed(0), Retriever(bank)
    )
    row_of(tp.negative, bank.bg_features)  # asserts every negative is a background row


def test_prototypes_are_class_means_and_negatives_another_class():
    bank = make_bank([1, 1, 2, 3, 3, 3], 3)
    protos = class_prototypes(bank)
    feats = F.normalize(torch.as_tensor(bank.fg_features), dim=1)
    assert torch.allclose(protos[0], F.normalize(feats[0] + feats[1], dim=0), atol=1e-6)
    assert torch.allclose(protos[1], feats[2], atol=1e-6)
    aligner = ForegroundAligner("prototype")
    aligner.set_memory(bank, "cpu")
    labels = torch.randint(1, 4, (300,), generator=torch.Generator().manual_seed(1))
    t = aligner.triplets(torch.randn(300, 16), labels, torch.Generator().manual_seed(0), Retriever(bank))
    pos = (t.positive @ protos.T).argmax(dim=1) + 1
    neg = (t.negative @ protos.T).argmax(dim=1) + 1
    assert torch.equal(pos, labels) and (neg != labels).all()
    assert len(neg.unique()) == 3


def test_inbatch_c2c_and_agnostic_pairs():
    src = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0]])
    source = SourceInstances(src, torch.tensor([1, 2, 2]), torch.tensor([[0.0, 0.0, 1.0]]))
    anchors = torch.tensor([[1.0, 0.05, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([2, 3, 1])  # class 3 is absent from the source batch
    g = torch.Generator().manual_seed(0)
    c2c = inbatch_triplets(source, anchors, labels, g, class_aware=True)
    assert len(c2c.anchor) == 2  # the class-3 anchor is skipped
    assert torch.allclose(c2c.positive, F.normalize(src[[2, 0]], dim=1))  # same class, most similar
    # negatives: another class of the batch (class 1 row 0 for the class-2 anchor; a class-2 row for class 1)
    assert torch.allclose(c2c.negative[0], F.normalize(src[0], dim=0))
    assert any(torch.allclose(c2c.negative[1], F.normalize(src[r], dim=0)) for r in (1, 2))
    agn = inbatch_triplets(source, anchors, labels, g, class_aware=False)
    assert len(agn.anchor) == 3  # no anchor skipped; any class: row 0 beats row 2 for the first anchor
    assert torch.allclose(agn.positive, F.normalize(src[[0, 0, 0]], dim=1))
    assert torch.allclose(agn.negative, torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3))  # the background


def test_background_loss_pairs_with_the_most_similar_memory_entry_and_reverses_gradient():
    bank = make_bank([1, 2], 2, n_bg=4)
    retriever = Retriever(bank)
    torch.manual_seed(0)
    disc = FeatureDiscriminator(16, hidden=8)
    target = torch.as_tensor(bank.bg_features[[2, 0]]).clone().requires_grad_(True)
    idx, _ = retriever.topk_background(target, k=1)
    assert idx[:, 0].tolist() == [2, 0]
    loss, disc_loss, accuracy = background_loss(disc, retriever, target)
    assert torch.equal(loss.detach(), disc_loss)
    assert 0.0 <= accuracy <= 1.0
    loss.backward()
    assert target.grad.abs().sum() > 0
    # the target's gradient is the reverse of what minimising the discriminator's loss would ask
    t2 = target.detach().clone().requires_grad_(True)
    from vspa.adaptation.losses import domain_bce

    domain_bce(disc(F.normalize(t2, dim=1)), 1.0).backward()
    assert torch.allclose(target.grad, -t2.grad, atol=1e-6)


# --------------------------------------------------------------------------- config


def test_config_defaults_errors_and_override_section():
    cfg = adapt_config(iterations=5, batch_size=2, lr=0.01, weight_decay=None)
    assert cfg.tau == 0.8 and cfg.margin == 1.5 and cfg.top_k == 1 and cfg.needs_memory
    assert cfg.weight_decay == 1e-4  # null: the dataclass default of a key conf does not state
    with pytest.raises(VspaError, match="adapt.tau is not set"):  # conf states tau: null is no value
        adapt_config(iterations=5, batch_size=2, lr=0.01, tau=None)
    with pytest.raises(VspaError, match="unknown key.*lamda_fg"):
        adapt_config(iterations=5, batch_size=2, lr=0.01, lamda_fg=0.1)
    with pytest.raises(VspaError, match="fg_mode must be one of"):
        adapt_config(iterations=5, batch_size=2, lr=0.01, fg_mode="memroy")
    with pytest.raises(VspaError, match="adapt.iterations is not set"):
        AdaptConfig.from_params({k: v for k, v in default_section("adapt").items() if k != "iterations"})
    at_like = adapt_config(iterations=5, batch_size=2, lr=0.01, fg_mode="off", bg_mode="off")
    assert not at_like.needs_memory
    # `-S adapt_vspa.bg_mode=off` is written unquoted, and YAML 1.1 reads it back as false: still "off"
    unquoted = adapt_config(**yaml.safe_load("iterations: 5\nbatch_size: 2\nlr: 0.01\nbg_mode: off\n"))
    assert unquoted.bg_mode == "off" and not unquoted.use_bg
    sys.path.insert(0, str(ROOT / "stages"))
    from adapt import adapt_section

    params = {
        "scenario": "synth_fog",
        "adapt": {"iterations": 9, "lambda_fg": 0.05},
        "adapt_at_like": {"fg_mode": "off", "lambda_fg": None},
    }
    merged = adapt_section(params, "at_like")
    assert merged["fg_mode"] == "off" and merged["lambda_fg"] == 0.05 and merged["iterations"] == 9
    plain = adapt_section(params, "vspa")  # no section adapt_vspa: adapt as it is
    assert plain["iterations"] == 9 and plain.get("fg_mode") != "off"
    with pytest.raises(VspaError, match="adapt_bad"):
        adapt_section({"scenario": "synth_fog", "adapt": {}, "adapt_bad": [1]}, "bad")


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def tiny_inputs(tiny_benchmark, tmp_path_factory):
    """An untrained tiny source detector, its memory (coreset-subsampled) and the datasets."""
    root = tmp_path_factory.mktemp("adapt_inputs")
    untrained_source_and_memory(tiny_benchmark / "source_train" / "annotations.json", root, TINY_MODEL, "coreset", 0.5)
    return {"root": root, "bench": tiny_benchmark, "model": root / "source.pt", "memory": root / "memory.h5"}


def run_adapt(inputs, work: Path, target=None, **over):
    from vspa.data.coco import DetectionDataset
    from vspa.detection import checkpoint

    bench = inputs["bench"]
    src_json, tgt_json = bench / "source_train" / "annotations.json", bench / "target_train" / "annotations.json"
    values = dict(
        iterations=4,
        batch_size=2,
        lr=0.01,
        tau=0.0,
        ema_keep=0.9,
        device="cpu",
        checkpoint_every=2,
        refresh_every=2,
        lambda_img=0.1,
    )
    cfg = adapt_config(**{**values, **over})
    student, _ = checkpoint.load(inputs["model"])
    torch.manual_seed(cfg.seed)
    data = AdaptData(
        DetectionDataset(src_json),
        target if target is not None else DetectionDataset(tgt_json),
        inputs["memory"],
        input_fingerprint(inputs["model"], src_json, tgt_json, inputs["memory"]),
    )
    teacher, summary = adapt(student, data, cfg, work, work / "losses.csv", progress=False)
    return student, teacher, summary


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_resume_after_kill_equals_uninterrupted_run(tiny_inputs, tmp_path, amp):
    from vspa.data.coco import DetectionDataset

    torch.set_num_threads(1)
    s_ref, t_ref, summary = run_adapt(tiny_inputs, tmp_path / "ref", amp=amp)
    assert summary["refreshes"] == 1 and summary["fg_pairs_per_iter"] > 0
    rows_ref = read_rows(tmp_path / "ref" / "losses.csv")
    assert [int(r["iteration"]) for r in rows_ref] == [1, 2, 3, 4]
    assert all(float(r["loss_fg"]) > 0 and float(r["loss_bg"]) > 0 for r in rows_ref)

    target = DetectionDataset(tiny_inputs["bench"] / "target_train" / "annotations.json")
    with pytest.raises(Killed):  # killed in iteration 4 (2 target images per iteration)
        run_adapt(tiny_inputs, tmp_path / "killed", target=DiesAfter(target, calls=7), amp=amp)
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    assert state["iteration"] == 2 and state["memory"] is not None  # the refreshed memory is in the state
    assert ("scaler" in state) == amp
    s_res, t_res, _ = run_adapt(tiny_inputs, tmp_path / "killed", amp=amp)
    for ref, res in ((s_ref, s_res), (t_ref, t_res)):
        a, b = ref.state_dict(), res.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows_res = read_rows(tmp_path / "killed" / "losses.csv")
    keys = [k for k in rows_ref[0] if not k.startswith("time")]
    assert [[r[k] for k in keys] for r in rows_res] == [[r[k] for k in keys] for r in rows_ref]
    # and the teacher really moved away from the source model
    from vspa.detection import checkpoint

    source, _ = checkpoint.load(tiny_inputs["model"])
    assert any(not torch.equal(v, t_ref.state_dict()[k]) for k, v in source.state_dict().items())


@pytest.mark.parametrize(("fg_mode", "align_view"), [("inbatch_c2c", "strong"), ("prototype", "weak"), ("off", "weak")])
def test_variants_run(tiny_inputs, tmp_path, fg_mode, align_view):
    torch.set_num_threads(1)
    memory = tiny_inputs["memory"] if fg_mode == "prototype" else None  # the others must not need one
    _, _, summary = run_adapt(
        {**tiny_inputs, "memory": memory},
        tmp_path,
        iterations=1,
        fg_mode=fg_mode,
        bg_mode="off",
        refresh_every=0,
        lambda_img=0.0,
        source_strong=False,
        align_view=align_view,
    )
    rows = read_rows(tmp_path / "losses.csv")
    assert (float(rows[0]["loss_fg"]) > 0) == (fg_mode != "off")
    assert float(rows[0]["loss_bg"]) == 0 and float(rows[0]["loss_img"]) == 0
    assert (float(rows[0]["time_align"]) > 0) == (fg_mode != "off")
    assert summary["fg_mode"] == fg_mode


def write_params(path: Path, **adapt_over) -> None:
    import yaml

    adapt = dict(iterations=2, batch_size=2, lr=0.01, tau=0.0, ema_keep=0.9, device="cpu", checkpoint_every=1)
    path.write_text(
        yaml.safe_dump(
            {
                "scenario": "synth_fog",
                "adapt": {**default_section("adapt"), **adapt, **adapt_over},
                "adapt_at_like": {"fg_mode": "off", "bg_mode": "off"},
            }
        )
    )


def run_stage(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "adapt.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_stage_end_to_end_writes_an_evaluable_teacher(tiny_inputs, tmp_path):
    from vspa.detection import checkpoint
    from vspa.evaluation.runner import evaluate_model

    bench = tiny_inputs["bench"]
    write_params(tmp_path / "params.yaml")
    common = [
        "--params",
        "params.yaml",
        "--model",
        str(tiny_inputs["model"]),
        "--source",
        str(bench / "source_train"),
        "--target",
        str(bench / "target_train"),
        "--memory",
        str(tiny_inputs["memory"]),
    ]
    proc = run_stage(
        [*common, "--name", "vspa", "--out", "models/adapt/vspa", "--log-dir", "reports/adapt/vspa"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapt.amp is true" not in proc.stderr  # the mixed-precision note: float32 here
    model = tmp_path / "models" / "adapt" / "vspa" / "model.pt"
    detector, meta = checkpoint.load(model)
    assert meta["extra"]["selected"] == "final teacher" and meta["extra"]["adapt"]["fg_mode"] == "memory"
    state = torch.load(tmp_path / "models" / "adapt" / "vspa" / "work" / "last.pt", weights_only=False)
    assert all(torch.equal(v, state["teacher"][k]) for k, v in detector.state_dict().items())
    metrics, _ = evaluate_model(model, bench / "target_test", "cpu", batch_size=4, progress=False)
    assert metrics["num_images"] == 4 and set(metrics["AP"]) == {"car", "person", "truck"}
    rows = read_rows(tmp_path / "reports" / "adapt" / "vspa" / "losses.csv")
    assert len(rows) == 2 and float(rows[-1]["loss_fg"]) > 0
    import json

    summary = json.loads((tmp_path / "reports" / "adapt" / "vspa" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["align_sec_per_iter"] > 0

    # the full method with a missing memory file: one line naming the file, exit status 2; under amp the
    # stage first prints its note on mixed-precision adaptation
    write_params(tmp_path / "params_amp.yaml", amp=True)
    proc = run_stage(
        [
            "--params",
            "params_amp.yaml",
            *common[2:-1],
            str(tmp_path / "absent.h5"),
            "--name",
            "vspa2",
            "--out",
            "models/adapt/vspa2",
            "--log-dir",
            "reports/adapt/vspa2",
        ],
        tmp_path,
    )
    assert proc.returncode == 2
    assert "absent.h5: memory file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "adapt.amp is true" in proc.stderr and "drifted on 3 of 4 seeds" in proc.stderr


WORKER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_adaptation_train import run_adapt
    from vspa.detection import distributed
    torch.set_num_threads(1)
    inputs = {{"bench": Path({bench!r}), "model": Path({model!r}), "memory": Path({memory!r})}}
    student, teacher, _ = run_adapt(inputs, Path({work!r}), iterations=3, batch_size=4, refresh_every=2)
    ctx = distributed.setup("cpu")
    torch.save(teacher.state_dict(), {out!r} + f"/rank{{ctx.rank}}.pt")
    distributed.cleanup(ctx)
    """
)


def test_two_processes_adapt_in_sync(tiny_inputs, tmp_path):
    script = tmp_path / "worker.py"
    work = tmp_path / "work"
    script.write_text(
        WORKER.format(
            tests=str(ROOT / "tests"),
            bench=str(tiny_inputs["bench"]),
            model=str(tiny_inputs["model"]),
            memory=str(tiny_inputs["memory"]),
            work=str(work),
            out=str(tmp_path),
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same gradients and the same (refreshed) memory
    assert (work / "memory_refresh.h5").is_file()
    assert [int(r["iteration"]) for r in read_rows(work / "losses.csv")] == [1, 2, 3]


class NoTargetImages(torch.utils.data.Dataset):
    """A target split whose images must not be read (the fair source-only baseline)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.class_names = dataset.class_names

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        raise AssertionError("the fair source-only run read a target image")


def test_fair_source_only_reads_no_target_image_and_evaluates_the_ema(tiny_inputs, tmp_path):
    from vspa.data.coco import DetectionDataset
    from vspa.detection import checkpoint

    torch.set_num_threads(1)
    target = NoTargetImages(DetectionDataset(tiny_inputs["bench"] / "target_train" / "annotations.json"))
    over = dict(iterations=3, lambda_unsup=0.0, lambda_img=0.0, fg_mode="off", bg_mode="off", refresh_every=0)
    assert not adapt_config(batch_size=2, lr=0.01, **over).uses_target
    student, teacher, summary = run_adapt({**tiny_inputs, "memory": None}, tmp_path, target=target, **over)
    rows = read_rows(tmp_path / "losses.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss_unsup"]) == 0 and float(r["pseudo_per_image"]) == 0 for r in rows)
    assert all(float(r["loss_sup"]) > 0 for r in rows)
    source, _ = checkpoint.load(tiny_inputs["model"])
    s, t, src = student.state_dict(), teacher.state_dict(), source.state_dict()
    # the teacher is the EMA (keep 0.9): it moved from the source model, but less than the student did
    moved = [k for k in src if src[k].is_floating_point() and not torch.equal(src[k], s[k])]
    assert moved
    for k in moved[:5]:
        assert not torch.equal(t[k], s[k]) and not torch.equal(t[k], src[k])
    assert sum((t[k] - src[k]).norm() for k in moved) < sum((s[k] - src[k]).norm() for k in moved)


def test_snapshots_are_the_teacher_at_that_iteration(tiny_inputs, tmp_path):
    from vspa.detection import checkpoint

    torch.set_num_threads(1)
    assert "snapshot_every" not in adapt_config(iterations=2, batch_size=2, lr=0.01).record()  # records unchanged
    _, short, _ = run_adapt(tiny_inputs, tmp_path / "short", iterations=2, refresh_every=0)
    _, _, _ = run_adapt(tiny_inputs, tmp_path / "long", iterations=4, refresh_every=0, snapshot_every=2)
    assert sorted(p.name for p in (tmp_path / "long").glob("teacher_*.pt")) == ["teacher_2.pt"]  # not the final
    snap, meta = checkpoint.load(tmp_path / "long" / "teacher_2.pt")
    assert meta["extra"]["snapshot"] == 2
    a, b = snap.state_dict(), short.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "short").glob("teacher_*.pt"))


def test_adaptation_with_amp_runs_and_keeps_the_scaler(tiny_inputs, tmp_path):
    torch.set_num_threads(1)
    _, teacher, summary = run_adapt(tiny_inputs, tmp_path, iterations=2, refresh_every=0, amp=True)
    rows = read_rows(tmp_path / "losses.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["total"])) for r in rows)
    assert all(float(r["loss_fg"]) > 0 for r in rows)  # the alignment terms ran under autocast too
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0
