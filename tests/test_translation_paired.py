"""Paired translator runs (issue 17): every random draw comes from a stream of (seed, purpose, iteration), so the
variants cut / attention / attention_lg of one seed see the same crops, start from the same encoder and
discriminator, and draw the same PatchNCE locations at every iteration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vspa.translation import trainer
from vspa.translation import data as translation_data
from vspa.translation.config import VARIANTS, TranslateConfig
from vspa.translation.data import UnpairedImages, training_batch, views_generator
from vspa.translation.trainer import TranslationModels

from conftest import translate_section

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_cfg(variant: str, **overrides) -> TranslateConfig:
    section = translate_section(
        tiny=True, variant=variant, **{"iterations": 3, "queue_size": 4, "checkpoint_every": 100, **overrides}
    )
    return TranslateConfig.from_params(section)


@pytest.fixture(scope="module")
def splits(tiny_benchmark) -> tuple[Path, Path]:
    return tiny_benchmark / "target_train", tiny_benchmark / "source_train"


def domains(splits, cfg: TranslateConfig) -> tuple[UnpairedImages, UnpairedImages]:
    crop = (cfg.crop_height, cfg.crop_width)
    return UnpairedImages(splits[0], crop, cfg.size_multiple), UnpairedImages(splits[1], crop, cfg.size_multiple)


def test_training_batch_is_a_function_of_seed_and_iteration(splits):
    cfgs = {v: tiny_cfg(v) for v in VARIANTS}
    targets, sources = domains(splits, cfgs["attention_lg"])
    reference = [training_batch(targets, sources, cfgs["cut"], k) for k in range(4)]
    for variant in ("attention", "attention_lg"):
        for k in (3, 0, 2, 1):  # any order, any variant: the same crops
            a, b = training_batch(targets, sources, cfgs[variant], k)
            assert torch.equal(a, reference[k][0]) and torch.equal(b, reference[k][1])
    assert not torch.equal(reference[0][0], reference[1][0])  # the crops do change from one iteration to the next
    other = training_batch(targets, sources, tiny_cfg("cut", seed=1), 0)
    assert not torch.equal(other[0], reference[0][0])  # and with the seed
    # every image once per epoch (6 target images, batch 1)
    assert sorted(i for k in range(6) for i in targets.indices(1, 0, k, translation_data._TGT_ORDER)) == list(range(6))
    # the local-global views: one generator per iteration, the same for every variant
    assert torch.equal(
        torch.rand(3, generator=views_generator(cfgs["attention"], 2)),
        torch.rand(3, generator=views_generator(cfgs["attention_lg"], 2)),
    )


def test_variants_start_from_the_same_encoder_and_discriminator():
    models = {v: TranslationModels(tiny_cfg(v)) for v in VARIANTS}
    for v in ("attention", "attention_lg"):
        for part in ("generator.encoder", "discriminator", "nce"):
            a, b = models["cut"].get_submodule(part).state_dict(), models[v].get_submodule(part).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), (v, part)
    a, b = models["attention"].generator.state_dict(), models["attention_lg"].generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the whole translator: L_GA's parts are drawn after it


def test_every_variant_sees_the_same_crops_and_patch_draws_in_training(splits, tmp_path, monkeypatch):
    """The trainer itself: what train_step receives at each iteration (crops, the global RNG that PatchNCE
    samples from, the views' generator) is the same for the three variants of one seed."""
    seen: dict[str, list] = {}
    real_step = trainer.train_step

    def recording(models, gan, opt_g, opt_d, real_a, real_b, cfg, ga_weight=None, views_rng=None):
        seen.setdefault(cfg.variant, []).append(
            (real_a.clone(), real_b.clone(), torch.get_rng_state(), views_rng.get_state(), ga_weight)
        )
        return real_step(models, gan, opt_g, opt_d, real_a, real_b, cfg, ga_weight, views_rng)

    monkeypatch.setattr(trainer, "train_step", recording)
    for variant in VARIANTS:
        out = tmp_path / variant
        trainer.train_translator(
            tiny_cfg(variant), *splits, out / "model.pt", out / "state.pt", out / "losses.csv", progress=False
        )
    assert [len(seen[v]) for v in VARIANTS] == [3, 3, 3]
    for k in range(3):
        ref = seen["cut"][k]
        for variant in ("attention", "attention_lg"):
            got = seen[variant][k]
            assert all(torch.equal(x, y) for x, y in zip(got[:4], ref[:4])), (variant, k)
    lam = tiny_cfg("attention_lg").lambda_ga
    assert [row[4] for row in seen["attention_lg"]] == [0.0, lam / 2, lam]  # L_GA's warm-up over 2 iterations


def test_local_global_views_follow_the_generator():
    from vspa.translation.local_global import LocalGlobalLoss

    cfg = tiny_cfg("attention_lg")
    models = TranslationModels(cfg)
    twin = TranslationModels(cfg)
    x = torch.rand(1, 3, 32, 64) * 2 - 1
    loss_a, _ = models.local_global(models.generator, x, views_generator(cfg, 5))
    loss_b, _ = twin.local_global(twin.generator, x, views_generator(cfg, 5))
    assert loss_a.item() == loss_b.item()
    assert isinstance(models.local_global, LocalGlobalLoss)
