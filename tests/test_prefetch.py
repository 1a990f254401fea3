"""Batches made ahead in data threads (vspa.training.prefetch): same batches in the same order, errors raised
where the batch is asked for, threads stopped on an early end, and training identical with and without."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from test_adaptation_train import read_rows, run_adapt, tiny_inputs  # noqa: F401 (a fixture)
from test_train import DiesAfter, Killed, TinyDataset, fresh_detector, read_csv, train_cfg
from vspa.detection.train import train_detector
from vspa.training.prefetch import ENV, Prefetcher, default_workers, pinned, to_device
from vspa.utils import VspaError


def _data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vspa-data")]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_come_in_order_and_equal_the_inline_ones(workers):
    def make(i):
        time.sleep(0.002 * ((7 * i) % 5))  # out-of-order completion in the threads
        g = torch.Generator().manual_seed(i)
        return i, torch.rand(3, generator=g)

    got = list(Prefetcher(make, range(2, 14), workers))
    assert [i for i, _ in got] == list(range(2, 14))
    for i, x in got:
        assert torch.equal(x, torch.rand(3, generator=torch.Generator().manual_seed(i)))
    assert not _data_threads()


def test_the_window_is_workers_plus_one_ahead():
    made: list[int] = []
    lock = threading.Lock()

    def make(i):
        with lock:
            made.append(i)
        return i

    with Prefetcher(make, range(100), workers=2) as batches:
        it = iter(batches)
        assert next(it) == 0
        time.sleep(0.2)  # let the threads finish what they were given
        assert sorted(made) == [0, 1, 2, 3]  # the one handed out, and three ahead (workers + 1)
    assert not _data_threads()


def test_an_error_is_raised_at_its_batch_and_the_threads_stop():
    def make(i):
        if i == 3:
            raise VspaError("image 3 is unreadable")
        return i

    got = []
    with pytest.raises(VspaError, match="image 3 is unreadable"):
        for x in Prefetcher(make, range(10), workers=2):
            got.append(x)
    assert got == [0, 1, 2]
    assert not _data_threads()


def test_an_early_end_cancels_the_rest():
    calls = []

    def make(i):
        calls.append(i)
        return i

    prefetcher = Prefetcher(make, range(1000), workers=2)
    for x in prefetcher:
        if x == 5:
            break
    prefetcher.close()
    assert len(calls) <= 9 and not _data_threads()


def test_default_workers(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cpu") == 0 and default_workers(torch.device("cuda", 0)) == 1
    monkeypatch.setenv(ENV, "3")
    assert default_workers("cpu") == 3
    for bad in ("many", "\u00b2"):  # a superscript two is a digit to str.isdigit, not to int()
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(VspaError, match=ENV):
            default_workers("cpu")


def test_to_device_keeps_the_structure():
    batch = ([torch.ones(2)], [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([1])}], "x", (torch.ones(1),))
    moved = to_device(batch, "cpu")
    assert moved[2] == "x" and isinstance(moved[3], tuple)
    assert torch.equal(moved[1][0]["boxes"], batch[1][0]["boxes"]) and torch.equal(moved[0][0], batch[0][0])


def test_pretrain_with_data_threads_is_identical_and_resumes(tmp_path, monkeypatch):
    cfg = train_cfg()
    monkeypatch.setenv(ENV, "0")
    inline = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "a", tmp_path / "a.csv", progress=False)
    monkeypatch.setenv(ENV, "3")
    threaded = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "b", tmp_path / "b.csv", progress=False)
    assert read_csv(tmp_path / "a.csv") == read_csv(tmp_path / "b.csv")
    for (name, a), b in zip(inline.state_dict().items(), threaded.state_dict().values()):
        assert torch.equal(a, b), name
    # killed (the dataset raises in a data thread at its 8th image: iteration 4's batch), resumed: the same
    with pytest.raises(Killed):
        train_detector(DiesAfter(calls=8), fresh_detector(), cfg, tmp_path / "c", tmp_path / "c.csv", progress=False)
    assert not _data_threads()
    resumed = train_detector(TinyDataset(), fresh_detector(), cfg, tmp_path / "c", tmp_path / "c.csv", progress=False)
    for (name, a), b in zip(inline.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_adaptation_with_data_threads_is_identical(tiny_inputs, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv(ENV, "0")
    _, inline, _ = run_adapt(tiny_inputs, tmp_path / "a")
    monkeypatch.setenv(ENV, "2")  # with memory refreshes (every 2 iterations) reading the source split meanwhile
    _, threaded, _ = run_adapt(tiny_inputs, tmp_path / "b")
    for (name, a), b in zip(inline.state_dict().items(), threaded.state_dict().values()):
        assert torch.equal(a, b), name
    skip = {"time_iter", "time_align", "time_backward"}
    strip = [{k: v for k, v in r.items() if k not in skip} for r in read_rows(tmp_path / "a" / "losses.csv")]
    assert strip == [{k: v for k, v in r.items() if k not in skip} for r in read_rows(tmp_path / "b" / "losses.csv")]
    assert not _data_threads()


def test_pinned_pins_every_tensor_when_enabled_only(monkeypatch):
    calls: list[tuple] = []

    def fake_pin(self):  # this machine has no CUDA driver to pin with: record what was pinned
        calls.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = ([torch.zeros(3, 4, 5)], [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 2])}])
    assert pinned(batch, enabled=False) is batch and calls == []
    out = pinned(batch)
    assert sorted(calls) == [(2,), (2, 4), (3, 4, 5)] and torch.equal(out[1][0]["boxes"], batch[1][0]["boxes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, asynchronous copies)")
def test_pinned_batches_arrive_intact_on_cuda():
    def make(i):
        return pinned([torch.full((3, 64, 64), float(i)), torch.arange(i, i + 5)])

    for i, batch in enumerate(Prefetcher(make, range(50), workers=2)):
        image, ids = to_device(batch, "cuda")
        assert float(image.mean()) == float(i) and ids.cpu().tolist() == list(range(i, i + 5))


def test_a_data_thread_computes_with_the_loop_s_thread_count():
    from vspa.data import transforms

    image = torch.rand(3, 600, 1200, generator=torch.Generator().manual_seed(0))

    def make(i):
        return torch.get_num_threads(), transforms.strong(image, torch.Generator().manual_seed(i))

    before = torch.get_num_threads()
    try:
        for loop_threads in (1, 2):
            torch.set_num_threads(loop_threads)
            inline = list(Prefetcher(make, range(3), workers=0))
            threaded = list(Prefetcher(make, range(3), workers=2))
            assert [n for n, _ in threaded] == [loop_threads] * 3 and torch.get_num_threads() == loop_threads
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(inline, threaded))  # real-size strong views
    finally:
        torch.set_num_threads(before)


def test_evaluation_with_data_threads_gives_the_same_detections(tiny_inputs, monkeypatch, one_thread):
    from vspa.data.coco import DetectionDataset
    from vspa.detection import checkpoint
    from vspa.evaluation.runner import run_detector

    detector, _ = checkpoint.load(tiny_inputs["model"])
    dataset = DetectionDataset(tiny_inputs["bench"] / "target_test" / "annotations.json")
    monkeypatch.setenv(ENV, "0")
    inline = run_detector(detector, dataset, "cpu", batch_size=3, progress=False)
    monkeypatch.setenv(ENV, "2")
    threaded = run_detector(detector, dataset, "cpu", batch_size=3, progress=False)
    assert len(inline) == len(dataset) == len(threaded)
    for a, b in zip(inline, threaded):
        assert all((a[k] == b[k]).all() and a[k].shape == b[k].shape for k in ("boxes", "labels", "scores"))
