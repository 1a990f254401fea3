"""Issue 17: a local-global loss that learns (standardised features, primed queue, weight with warm-up), mask
logits that start distinct with a background that re-synthesises, and the per-run diagnostics."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vspa.translation.diagnostics import attention_stats, box_mask, gradient_norms, lg_separation
from vspa.translation.generator import Translator, TranslatorConfig, init_mask_head
from vspa.translation.local_global import LocalGlobalLoss, RunningStandardize
from vspa.translation.config import TranslateConfig
from vspa.translation.data import image_paths, read_image
from vspa.translation.trainer import TranslationModels, ga_weight

from conftest import translate_section

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def crops(tiny_benchmark) -> torch.Tensor:
    """8 different 32x64 crops of real images: the 6 target training images and 2 source ones (96x192)."""
    paths = image_paths(tiny_benchmark / "target_train") + image_paths(tiny_benchmark / "source_train")[:2]
    return torch.stack([read_image(p)[:, 16:48, 32:96] for p in paths])


# --------------------------------------------------------------------------- attention masks


def test_mask_logits_start_distinct_and_the_background_low(crops):
    torch.manual_seed(0)
    g = Translator(TranslatorConfig(attention=True, ngf=16, n_blocks=1, n_content=9))
    images = SimpleNamespace(images=list(crops), objects=[torch.zeros(32, 64, dtype=torch.bool)] * len(crops))
    stats = attention_stats(g, images, "cpu")
    assert stats["mask_entropy_max"] == pytest.approx(math.log(10), abs=1e-4)
    assert stats["mask_entropy"] < 0.9 * stats["mask_entropy_max"]  # each pixel favours a few masks
    assert stats["usage_entropy"] > 0.95 * stats["mask_entropy_max"]  # but every mask is used
    assert stats["fg_usage_max"] < 2 * stats["fg_usage_min"]
    assert stats["bg_mean"] < 0.03  # starts by re-synthesising, not by copying the input
    with torch.no_grad():
        masks = g.translate(crops).masks
    assert masks[:, :-1].std(dim=(2, 3)).mean() > 0.02  # the masks vary over the image

    # the old initialisation (CUT's gain 0.02, zero biases): every mask 1 / (n + 1) everywhere
    init_mask_head(g.attention.logits, gain=0.02, background_bias=0.0)
    old = attention_stats(g, images, "cpu")
    assert old["mask_entropy"] > 0.999 * old["mask_entropy_max"] and old["bg_mean"] == pytest.approx(0.1, abs=0.005)


def test_box_mask_and_mask_statistics_hand_computed():
    assert box_mask([{"bbox": [1.5, 0.0, 2.0, 1.0]}], 2, 5).tolist() == [[False, True, True, True, False], [False] * 5]

    class Stub:  # background 0.8 on the left half, 0.2 on the right; two foreground masks share the rest
        cfg = SimpleNamespace(attention=True)
        training = False

        def eval(self):
            pass

        def train(self, mode=True):
            pass

        def translate(self, x):
            b, _, h, w = x.shape
            bg = torch.full((b, 1, h, w), 0.2)
            bg[..., : w // 2] = 0.8
            fg = (1 - bg) / 2
            return SimpleNamespace(masks=torch.cat([fg, fg, bg], dim=1))

    objects = torch.zeros(4, 8, dtype=torch.bool)
    objects[:, :2] = True  # a box on the left quarter
    stats = attention_stats(Stub(), SimpleNamespace(images=[torch.zeros(3, 4, 8)], objects=[objects]), "cpu")
    assert stats["bg_on_objects"] == pytest.approx(0.8)
    assert stats["bg_off_objects"] == pytest.approx((2 * 0.8 + 4 * 0.2) / 6, abs=1e-4)
    assert stats["bg_mean"] == pytest.approx(0.5) and stats["object_share"] == pytest.approx(0.25)
    # a foreground mask: 0.1 on the box, (2 * 0.1 + 4 * 0.4) / 6 = 0.3 off it
    assert stats["fg_object_gap_max"] == pytest.approx(0.1 - 0.3, abs=1e-4)
    entropy = lambda p: -sum(v * math.log(v) for v in p)  # noqa: E731
    assert stats["mask_entropy"] == pytest.approx((entropy([0.1, 0.1, 0.8]) + entropy([0.4, 0.4, 0.2])) / 2, abs=1e-4)


# --------------------------------------------------------------------------- local-global loss


def test_running_standardize_uses_the_spread_over_batches():
    stats = RunningStandardize(2, momentum=0.5)
    stats.update(torch.tensor([[1.0, 10.0]]))
    stats.update(torch.tensor([[3.0, 10.0]]))  # cumulative average: mean (2, 10), second moment (5, 100)
    torch.testing.assert_close(stats.mean, torch.tensor([2.0, 10.0]))
    out = stats(torch.tensor([[3.0, 10.0]], requires_grad=True))
    torch.testing.assert_close(out, torch.tensor([[1.0 / math.sqrt(1 + 1e-5), 0.0]]))


def test_standardised_features_tell_images_apart_where_raw_ones_do_not(crops):
    """Issue 17: pooled features after instance norm differ by a few percent between images, so unstandardised
    embeddings of any two views are almost parallel; standardised ones are not."""
    torch.manual_seed(0)
    g = Translator(TranslatorConfig(attention=True, ngf=8, n_blocks=1, n_content=3))
    lg = LocalGlobalLoss(g, hidden=64, dim=32, queue_size=16, momentum=0.9)
    with torch.no_grad():  # statistics never updated: the identity, i.e. the raw pooled features
        raw_q, _ = lg.embed(g, crops)
        raw_k, _ = lg.embed(g, crops.flip(-1), momentum=True)
    off = ~torch.eye(len(crops), dtype=torch.bool)
    assert min(float((q @ k.t())[off].min()) for q, k in zip(raw_q, raw_k)) > 0.95
    lg.prime(g, [crops], torch.Generator().manual_seed(1))
    assert int(lg.queue_ptr) == len(crops)
    sep = lg_separation(lg, g, crops, 3, "cpu")
    assert sep["lg_diff"] < 0.7 and sep["lg_gap"] > 0.1


def test_local_global_loss_learns_on_a_tiny_fixed_batch(crops):
    """40 steps of L_GA alone on 8 fixed crops: the loss falls and views of one image become each other's
    nearest neighbours more often than before (fresh views, not the ones trained on)."""
    torch.manual_seed(0)
    g = Translator(TranslatorConfig(attention=True, ngf=8, n_blocks=1, n_content=3))
    lg = LocalGlobalLoss(g, hidden=64, dim=32, queue_size=8, momentum=0.9)
    lg.prime(g, [crops], torch.Generator().manual_seed(1))
    before = lg_separation(lg, g, crops, 99, "cpu")
    params = list(g.encoder.parameters()) + list(g.attention.parameters()) + list(lg.heads.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for step in range(40):
        loss, _ = lg(g, crops, torch.Generator().manual_seed(1000 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = lg_separation(lg, g, crops, 99, "cpu")
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    assert after["lg_top1"] >= before["lg_top1"] + 0.25, (before, after)
    assert after["lg_gap"] > before["lg_gap"] + 0.05, (before, after)


def test_local_global_gradient_does_not_swamp_patchnce_at_init(tiny_benchmark):
    """The params' sizes (ngf, n_blocks, crops), L_GA primed on 32 target crops: at its full weight lambda_ga,
    L_GA's gradient on the encoder stays below PatchNCE's; the warm-up starts it at 0."""
    from vspa.translation.data import UnpairedImages, training_batch, views_generator
    from vspa.translation.trainer import prime_local_global

    cfg = TranslateConfig.from_params(translate_section(variant="attention_lg", queue_size=32, device="cpu"))
    crop = (cfg.crop_height, cfg.crop_width)
    targets = UnpairedImages(tiny_benchmark / "target_train", crop, cfg.size_multiple)
    sources = UnpairedImages(tiny_benchmark / "source_train", crop, cfg.size_multiple)
    models = TranslationModels(cfg)
    prime_local_global(models, targets, cfg, "cpu")
    ratios = []
    for it in range(6):
        real_a, real_b = training_batch(targets, sources, cfg, it)
        norms = gradient_norms(models, real_a, real_b, cfg.lambda_nce, cfg.lambda_ga, views_generator(cfg, it))
        ratios.append(norms["grad_encoder_ga"] / norms["grad_encoder_nce"])
    assert sorted(ratios)[len(ratios) // 2] < 1.0, ratios
    assert ga_weight(cfg, 0) == 0.0 and ga_weight(cfg, cfg.ga_warmup) == cfg.lambda_ga
    assert ga_weight(cfg, cfg.ga_warmup // 2) == pytest.approx(cfg.lambda_ga * (cfg.ga_warmup // 2) / cfg.ga_warmup)


# --------------------------------------------------------------------------- the stage's diagnostics


def test_attention_lg_run_writes_diagnostics_and_resumes_to_them(tiny_benchmark, tmp_path, monkeypatch):
    import json

    from vspa.translation import trainer

    cfg = TranslateConfig.from_params(translate_section(tiny=True, variant="attention_lg"))
    args = (tiny_benchmark / "target_train", tiny_benchmark / "source_train")
    trainer.train_translator(
        cfg,
        *args,
        tmp_path / "a/model.pt",
        tmp_path / "a/state.pt",
        tmp_path / "a/losses.csv",
        diagnostics_json=tmp_path / "a/diag.json",
        progress=False,
    )
    diag = json.loads((tmp_path / "a/diag.json").read_text())
    assert diag["images"] == 6  # the tiny split's 6 target images (at most DIAG_IMAGES)
    for key in ("mask_entropy", "bg_on_objects", "bg_off_objects", "lg_gap", "lg_top1"):
        assert diag["init"][key] is not None and diag["final"][key] is not None, key
    for key in ("grad_encoder_nce", "grad_encoder_ga", "grad_attention_nce", "grad_attention_ga"):
        assert diag["init"][key] > 0, key
    assert set(diag["losses"]["loss_GA"]) == {"first_10pct", "last_10pct"}

    real_step, calls = trainer.train_step, []

    def interrupted(*a, **k):  # dies in iteration 3, after the checkpoint of iteration 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_translator(
            cfg,
            *args,
            tmp_path / "b/model.pt",
            tmp_path / "b/state.pt",
            tmp_path / "b/losses.csv",
            diagnostics_json=tmp_path / "b/diag.json",
            progress=False,
        )
    monkeypatch.setattr(trainer, "train_step", real_step)
    trainer.train_translator(
        cfg,
        *args,
        tmp_path / "b/model.pt",
        tmp_path / "b/state.pt",
        tmp_path / "b/losses.csv",
        diagnostics_json=tmp_path / "b/diag.json",
        progress=False,
    )
    assert (tmp_path / "b/diag.json").read_text() == (tmp_path / "a/diag.json").read_text()
