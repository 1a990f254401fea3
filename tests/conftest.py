"""Shared fixtures, and the configs of the default composition (``from conftest import adapt_config``, ...)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_SIZES = {"source_train": 6, "source_test": 4, "target_train": 6, "target_test": 4}
TINY_HEIGHT, TINY_WIDTH = 96, 192


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """A tiny synth_fog benchmark (6/4/6/4 images of 96x192, seed 0): ``<path>/<split>/annotations.json``."""
    from vspa.data.synth import generate_benchmark

    out = tmp_path_factory.mktemp("tiny_benchmark")
    generate_benchmark(
        out,
        "synth_fog",
        TINY_SIZES,
        seed=0,
        height=TINY_HEIGHT,
        width=TINY_WIDTH,
        fog_beta=0.04,
        fog_airlight=0.8,
        workers=1,
        progress=False,
    )
    return out


@functools.cache
def _default_params() -> dict:
    from vspa.config import compose

    return compose(ROOT / "conf")  # once per process: Hydra takes about a second


def default_section(name: str) -> dict:
    """A copy of section ``name`` of the default composition of conf/ (the synth_fog scenario: params.yaml).

    The dataclasses have no defaults for what conf states (tests/test_config_defaults.py), so a config built in
    a test starts from these values."""
    return copy.deepcopy(_default_params()[name])


def adapt_config(**overrides):
    """``AdaptConfig`` of the default ``adapt`` section with ``overrides`` (parsed and validated)."""
    from vspa.adaptation.config import AdaptConfig

    return AdaptConfig.from_params({**default_section("adapt"), **overrides})


def detector_config(**overrides):
    """``DetectorConfig`` of the default ``model`` section with ``overrides`` (parsed and validated)."""
    from vspa.detection.model import DetectorConfig

    return DetectorConfig.from_params({**default_section("model"), **overrides})


def train_config(name: str = "pretrain", **overrides):
    """``TrainConfig`` of the default section ``name`` (pretrain / oracle) with ``overrides``."""
    from vspa.detection.train import TrainConfig

    return TrainConfig.from_params({**default_section(name), **overrides}, name=name)


TINY_DETECTOR = dict(  # a small-backbone detector at 64-128 pixels: seconds per test on the CPU
    backbone="small",
    small_width=8,
    min_size=64,
    max_size=128,
    anchor_sizes=[16, 32, 64],
    aspect_ratios=[0.5, 1.0],
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
)

TINY_TRANSLATOR = dict(  # a translator of a few tiny iterations: checks the plumbing, not the quality
    iterations=4,
    crop_height=32,
    crop_width=64,
    ngf=4,
    n_blocks=1,
    n_content=2,
    ndf=8,
    num_patches=16,
    queue_size=8,
    momentum=0.9,
    ga_warmup=2,
    seed=0,
    device="cpu",
    checkpoint_every=2,
)


def translate_section(tiny: bool = False, **overrides) -> dict:
    """The default ``translate`` section (with :data:`TINY_TRANSLATOR`'s sizes when ``tiny``) and ``overrides``."""
    return {**default_section("translate"), **(TINY_TRANSLATOR if tiny else {}), **overrides}


class Killed(Exception):
    """Raised by :class:`DiesAfter`: stands for a process killed mid-run (resume tests)."""


class DiesAfter(torch.utils.data.Dataset):
    """The dataset, but the ``calls``-th fetch raises :class:`Killed` (like a process killed mid-run)."""

    def __init__(self, dataset, calls: int):
        self.dataset, self.left = dataset, calls
        self.class_names = dataset.class_names

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise Killed
        return self.dataset[i]


def untrained_source_and_memory(source_json: Path, root: Path, model: dict, method: str, ratio: float) -> dict:
    """An untrained detector (``model``: DetectorConfig keys over the default ``model`` section, torch seed 0)
    saved as ``root/source.pt``, and the memory of the split ``source_json`` subsampled with ``method`` /
    ``ratio`` as ``root/memory.h5``."""
    from vspa.coreset.kcenter import subsample_memory
    from vspa.data.coco import DetectionDataset
    from vspa.detection import checkpoint
    from vspa.detection.model import build_detector
    from vspa.memory.extract import extract_memory
    from vspa.memory.store import open_memory, write_memory

    source = DetectionDataset(source_json)
    cfg = detector_config(**model)
    torch.manual_seed(0)
    det = build_detector(cfg, source.num_classes)
    checkpoint.save(root / "source.pt", det, cfg, source.class_names)
    extract_memory(det, source, root / "full.h5", progress=False)
    subset, _ = subsample_memory(open_memory(root / "full.h5"), method=method, fg_ratio=ratio, bg_ratio=ratio)
    write_memory(root / "memory.h5", subset)
    return {"model": root / "source.pt", "memory": root / "memory.h5"}


@pytest.fixture
def one_thread():
    """Torch at one thread for the test (tiny models gain nothing from threads, and on a shared 2-core machine
    OpenMP spinning costs 10x); the translator tests use it for every test (``pytestmark``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
