"""Supervised training: config, schedule, sampling, resume-after-kill, errors, loss log, two processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DETECTOR, default_section, detector_config, train_config

from vspa.detection.model import build_detector
from vspa.detection.train import CSV_COLUMNS, TrainConfig, global_batch, train_detector
from vspa.utils import VspaError

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(TINY_DETECTOR, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, box_batch_size_per_image=32)


class TinyDataset(torch.utils.data.Dataset):
    """Four 64x128 images, one or two coloured rectangles each (deterministic)."""

    def __init__(self, n: int = 4, fill: float | None = None):
        g = torch.Generator().manual_seed(3)
        self.items = []
        for i in range(n):
            image = 0.2 * torch.rand(3, 64, 128, generator=g) if fill is None else torch.full((3, 64, 128), fill)
            boxes = [[8 + 4 * i, 8, 48 + 4 * i, 52]] + ([[70, 16, 112, 40]] if i % 2 else [])
            labels = [1 + i % 2] + ([2] if i % 2 else [])
            for (x1, y1, x2, y2), label in zip(boxes, labels):
                if fill is None:
                    image[label - 1, y1:y2, x1:x2] = 0.9
            target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "index": i}
            self.items.append((image, target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        image, target = self.items[i]
        return image.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()}


class Killed(Exception):
    pass


class DiesAfter(TinyDataset):
    """Raises (like a killed process) at the ``calls``-th item fetched."""

    def __init__(self, calls: int):
        super().__init__()
        self.left = calls

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise Killed
        return super().__getitem__(i)


def train_cfg(**over) -> TrainConfig:
    # strong_aug on (the old code default; synth_fog has it off): the resume test covers the strong augmentation
    values = dict(iterations=6, batch_size=2, lr=0.01, warmup_iters=2, lr_steps=[5], strong_aug=True)
    return train_config(**{**values, "checkpoint_every": 3, "device": "cpu", **over})


def fresh_detector():
    torch.manual_seed(0)
    return build_detector(detector_config(**TINY_MODEL), 2)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_config_requires_values_and_checks_them():
    with pytest.raises(VspaError, match=r"pretrain\.lr is not set"):
        train_config(iterations=10, batch_size=2, lr=None)
    with pytest.raises(VspaError, match=r"pretrain\.momentum is not set"):  # conf states it: no code default
        TrainConfig.from_params({k: v for k, v in default_section("pretrain").items() if k != "momentum"})
    with pytest.raises(VspaError, match=r"oracle\.batch_size must be >= 1"):
        train_config("oracle", iterations=10, batch_size=0, lr=0.1)
    with pytest.raises(VspaError, match="unknown key.*epochs"):
        train_config(iterations=10, batch_size=2, lr=0.1, epochs=3)
    with pytest.raises(VspaError, match="lr_steps must be increasing"):
        train_config(iterations=10, batch_size=2, lr=0.1, lr_steps=[8, 4])


def test_lr_schedule_warms_up_linearly_then_steps():
    cfg = train_cfg(iterations=10, warmup_iters=4, lr_steps=[6, 8])
    assert cfg.lr_factor(0) == pytest.approx(0.001)
    assert cfg.lr_factor(2) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [cfg.lr_factor(i) for i in (4, 5, 6, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_global_batches_cover_each_epoch_once_and_are_reproducible():
    batches = [global_batch(5, 2, seed=7, iteration=i) for i in range(5)]  # 10 draws = two epochs of 5
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == sorted(flat[5:]) == [0, 1, 2, 3, 4]
    assert flat[:5] != flat[5:] or flat[:5] != [0, 1, 2, 3, 4]  # reshuffled per epoch (not the identity twice)
    assert batches == [global_batch(5, 2, seed=7, iteration=i) for i in range(5)]
    assert batches != [global_batch(5, 2, seed=8, iteration=i) for i in range(5)]


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, capsys):
    cfg = train_cfg()
    full = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "a", tmp_path / "a.csv", progress=False)

    with pytest.raises(Killed):  # dies during iteration 5, after the checkpoint of iteration 3
        train_detector(DiesAfter(calls=8), fresh_detector(), cfg, tmp_path / "b", tmp_path / "b.csv", progress=False)
    assert [int(r["iteration"]) for r in read_csv(tmp_path / "b.csv")] == [1, 2, 3]
    resumed = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "b", tmp_path / "b.csv", progress=False)
    assert "resuming from" in capsys.readouterr().err

    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows_a, rows_b = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert tuple(rows_a[0]) == CSV_COLUMNS
    assert [int(r["iteration"]) for r in rows_b] == [1, 2, 3, 4, 5, 6]
    assert rows_a == rows_b
    assert float(rows_a[0]["lr"]) == pytest.approx(0.01 * 0.001) and float(rows_a[5]["lr"]) == pytest.approx(0.001)
    init = fresh_detector().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in full.state_dict().items())


def test_a_different_config_starts_over(tmp_path, capsys):
    for lr in (0.01, 0.02):
        cfg = train_cfg(iterations=3, lr=lr)
        train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path, tmp_path / "l.csv", progress=False)
    assert "different configuration" in capsys.readouterr().err
    rows = read_csv(tmp_path / "l.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3] and float(rows[1]["lr"]) == pytest.approx(0.02 * 0.5005)


def test_non_finite_loss_names_the_iteration_and_the_fix(tmp_path):
    with pytest.raises(VspaError, match=r"diverged at iteration 1: non-finite loss.*Lower the learning rate"):
        train_detector(TinyDataset(fill=float("nan")), fresh_detector(), train_cfg(), tmp_path, tmp_path / "l.csv")
    assert not (tmp_path / "l.csv").exists()


def test_batch_not_divisible_by_processes_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(VspaError, match="batch_size 3 is not divisible by the 2 processes"):
        train_detector(TinyDataset(), fresh_detector(), train_cfg(batch_size=3), tmp_path, tmp_path / "l.csv")


WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import TinyDataset, fresh_detector, train_cfg
from vspa.detection import distributed
from vspa.detection.train import train_detector

torch.set_num_threads(1)
det = train_detector(TinyDataset(), fresh_detector(), train_cfg(iterations=3, batch_size=4, checkpoint_every=2),
                     {work!r}, {log!r}, progress=False)
ctx = distributed.setup("cpu")
torch.save(det.state_dict(), {out!r} + f"/rank{{ctx.rank}}.pt")
distributed.cleanup(ctx)
"""


def test_two_processes_train_in_sync_and_only_rank0_writes(tmp_path):
    script = tmp_path / "worker.py"
    work, log = tmp_path / "work", tmp_path / "logs" / "losses.csv"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), work=str(work), log=str(log), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # DDP kept both replicas identical
    init = fresh_detector().state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a.items())
    assert sorted(p.name for p in work.iterdir()) == ["last.pt"]
    assert [int(r["iteration"]) for r in read_csv(log)] == [1, 2, 3]
    state = torch.load(work / "last.pt", weights_only=True)
    assert state["iteration"] == 3 and all(torch.equal(state["model"][k], a[k]) for k in a)


def write_tiny_split(folder: Path) -> None:
    """A 4-image COCO split on disk (the TinyDataset images as PNGs)."""
    from PIL import Image

    from vspa.data.coco import write_coco

    images, annotations = [], []
    for i, (image, target) in enumerate(TinyDataset()):
        name = f"images/{i:06d}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / name)
        images.append({"id": i, "file_name": name, "width": 128, "height": 64})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": i,
                    "category_id": label,
                    "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                }
            )
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    write_coco(folder / "annotations.json", images, annotations, categories, info={"split": "train"})


def test_training_stage_writes_checkpoint_and_log_and_resumes(tmp_path, capsys):
    import yaml

    from vspa.detection import checkpoint
    from vspa.detection.train import run_training_stage

    write_tiny_split(tmp_path / "split")
    params = {
        "scenario": "synth_fog",
        "model": {**default_section("model"), **TINY_MODEL, "pretrained_weights": None},
        "oracle": {
            **default_section("oracle"),
            "seed": 0,
            "device": "cpu",
            "iterations": 2,
            "batch_size": 2,
            "lr": 0.01,
            "warmup_iters": 1,
            "lr_steps": [],
            "strong_aug": False,
            "checkpoint_every": 1,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = (
        str(tmp_path / "params.yaml"),
        "oracle",
        tmp_path / "split",
        tmp_path / "m.pt",
        tmp_path / "l.csv",
        tmp_path / "work",
        "oracle training",
    )
    run_training_stage(*args)
    detector, meta = checkpoint.load(tmp_path / "m.pt")
    assert meta["class_names"] == ["car", "person"] and meta["extra"]["stage"] == "oracle"
    assert meta["config"].small_width == TINY_MODEL["small_width"]
    assert [int(r["iteration"]) for r in read_csv(tmp_path / "l.csv")] == [1, 2]
    run_training_stage(*args)  # already complete: resumes at the end, same weights
    assert "resuming from" in capsys.readouterr().err
    again, _ = checkpoint.load(tmp_path / "m.pt")
    assert all(torch.equal(a, b) for a, b in zip(detector.state_dict().values(), again.state_dict().values()))
