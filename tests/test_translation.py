"""The translator (issue 7): attention composition, PatchNCE, local-global loss, momentum copy, training
resumption, and a tiny translate_train -> translate_apply -> evaluate run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from vspa.translation.generator import Encoder, Translator, TranslatorConfig, compose, default_nce_layers
from vspa.translation.local_global import LocalGlobalLoss, grid_patches, info_nce
from vspa.translation.losses import GANLoss, PatchNCELoss, patch_nce_loss
from vspa.translation.config import TranslateConfig
from vspa.translation.trainer import lr_factor
from vspa.utils import VspaError

from conftest import translate_section
from loaders import stage_main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_translator(attention: bool = True, seed: int = 0) -> Translator:
    torch.manual_seed(seed)
    return Translator(TranslatorConfig(attention=attention, ngf=4, n_blocks=1, n_content=3))


def smooth_images(b: int = 2, h: int = 32, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1] (upsampled noise), so that neighbouring patches differ but are not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, h // 8, w // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- generator


def test_attention_masks_sum_to_one_at_every_pixel():
    g = tiny_translator()
    out = g.translate(smooth_images())
    assert out.masks.shape == (2, 4, 32, 64) and out.content.shape == (2, 3, 3, 32, 64)
    assert (out.masks >= 0).all()
    torch.testing.assert_close(out.masks.sum(dim=1), torch.ones(2, 32, 64))


def test_background_mask_at_one_returns_the_input():
    g = tiny_translator()
    with torch.no_grad():  # logits = (0, ..., 0, 60) everywhere: softmax puts ~1 - 3e-26 on the background
        g.attention.logits.weight.zero_()
        g.attention.logits.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 60.0]))
    x = smooth_images()
    out = g.translate(x)
    torch.testing.assert_close(out.masks[:, -1], torch.ones(2, 32, 64))
    torch.testing.assert_close(out.image, x)


def test_compose_hand_computed():
    content = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1, 1).expand(1, 2, 3, 1, 1)
    masks = torch.tensor([0.2, 0.3, 0.5]).view(1, 3, 1, 1)
    x = torch.full((1, 3, 1, 1), 0.8)
    # 0.5 * 0.2 - 1.0 * 0.3 + 0.8 * 0.5 = 0.2
    torch.testing.assert_close(compose(content, masks, x), torch.full((1, 3, 1, 1), 0.2))


def test_plain_variant_has_no_masks_and_rejects_bad_sizes():
    g = tiny_translator(attention=False)
    out = g.translate(smooth_images())
    assert out.masks is None and out.content is None and out.image.shape == (2, 3, 32, 64)
    assert out.image.abs().max() <= 1.0
    with pytest.raises(VspaError, match="multiples of 4"):
        g(torch.zeros(1, 3, 30, 64))


def test_translate_image_keeps_sizes_that_are_not_multiples_of_4():
    from vspa.translation.apply import translate_image

    g = tiny_translator().eval()
    x = smooth_images(b=1, h=32, w=64)[0, :, :30, :61]
    out = translate_image(g, x)
    assert out.shape == (3, 30, 61)
    padded = torch.nn.functional.pad(x[None], (0, 3, 0, 2), mode="reflect")
    torch.testing.assert_close(out, g(padded)[0, :, :30, :61])


def test_default_nce_layers_follow_cut():
    assert default_nce_layers(9) == [0, 1, 2, 4, 8]  # input, stem, down1, block 1, block 5 (CUT's 0,4,8,12,16)
    assert default_nce_layers(2) == [0, 1, 2, 4, 5]
    assert Encoder(4, 2).tap_channels == [3, 4, 8, 16, 16, 16]


# --------------------------------------------------------------------------- losses


def test_gan_loss_modes_hand_computed():
    pred = torch.tensor([[0.5, -0.5]])
    assert GANLoss("lsgan")(pred, True).item() == pytest.approx((0.25 + 2.25) / 2)
    assert GANLoss("lsgan")(pred, False).item() == pytest.approx((0.25 + 0.25) / 2)
    assert GANLoss("bce")(torch.zeros(1, 4), True).item() == pytest.approx(math.log(2))
    with pytest.raises(VspaError, match="gan_mode must be one of lsgan, bce"):
        GANLoss("wgan")


def test_patch_nce_loss_hand_computed():
    q = torch.eye(2)  # two patches, orthogonal unit features, keys equal to queries
    tau = 0.5
    # row i: [positive 1, the other key 0, itself masked to -10] / tau
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(-10 / tau)))
    torch.testing.assert_close(patch_nce_loss(q, q.clone(), batch_size=1, tau=tau), torch.full((2,), expected))


def test_patch_nce_lower_for_identical_than_shuffled_and_reaches_encoder():
    g = tiny_translator()
    nce = PatchNCELoss(g.encoder, default_nce_layers(1), num_patches=64)
    x = smooth_images()
    perm = torch.randperm(32 * 64, generator=torch.Generator().manual_seed(3))
    shuffled = x.flatten(2)[:, :, perm].view_as(x)
    torch.manual_seed(5)
    same = nce(g.encoder, x, x.clone())
    torch.manual_seed(5)  # the same sampled locations
    other = nce(g.encoder, x, shuffled)
    assert same.item() < other.item()
    g.zero_grad()
    nce(g.encoder, x, g(x)).backward()
    for name in ("stem.1.weight", "blocks.0.body.1.weight"):
        grad = dict(g.encoder.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert g.content.out[1].weight.grad.abs().sum() > 0  # through G(x)


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.2
    expected = -math.log(math.exp(5) / (math.exp(5) + math.exp(0) + math.exp(-5)))
    assert info_nce(q, q.clone(), queue, tau).item() == pytest.approx(expected, rel=1e-5)


def test_grid_patches_order():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    patches = grid_patches(x, 2)
    assert patches.shape == (4, 1, 2, 2)
    assert patches[1, 0].tolist() == [[2.0, 3.0], [6.0, 7.0]]  # top-right quarter
    assert patches[2, 0].tolist() == [[8.0, 9.0], [12.0, 13.0]]  # bottom-left quarter
    with pytest.raises(VspaError, match="multiples of 16"):
        grid_patches(torch.zeros(1, 3, 30, 32), 4)


# --------------------------------------------------------------------------- local-global loss


def test_local_global_step_changes_attention_decoder_only():
    g = tiny_translator()
    lg = LocalGlobalLoss(g, hidden=16, dim=8, queue_size=16, momentum=0.9)
    before = {n: p.detach().clone() for n, p in g.named_parameters()}
    opt = torch.optim.SGD(list(g.parameters()) + list(lg.heads.parameters()), lr=0.5)
    torch.manual_seed(0)
    loss, terms = lg(g, smooth_images(h=32, w=64))
    assert set(terms) == {"gg", "lg", "ll"} and loss.item() == pytest.approx(sum(terms.values()), rel=1e-5)
    loss.backward()
    opt.step()
    changed = {n for n, p in g.named_parameters() if not torch.equal(p, before[n])}
    assert {"attention.up1.2.weight", "attention.up2.2.weight", "attention.logits.weight"} <= changed
    assert "encoder.stem.1.weight" in changed
    assert not any(n.startswith("content.") for n in changed)  # L_GA never reaches G_C
    assert int(lg.queue_ptr) == 2  # the batch's keys were queued


def test_momentum_copy_follows_the_ema_rule():
    g = tiny_translator()
    lg = LocalGlobalLoss(g, hidden=16, dim=8, queue_size=16, momentum=0.9)
    assert torch.equal(lg.momentum_attention.logits.weight, g.attention.logits.weight)  # starts as a copy
    with torch.no_grad():
        for p in list(g.parameters()) + list(lg.heads.parameters()):
            p.add_(torch.randn_like(p))
    old = lg.momentum_attention.logits.weight.clone()
    old_head = lg.momentum_heads.local_heads[2][0].weight.clone()
    lg.momentum_update(g)
    torch.testing.assert_close(lg.momentum_attention.logits.weight, 0.9 * old + 0.1 * g.attention.logits.weight)
    torch.testing.assert_close(
        lg.momentum_heads.local_heads[2][0].weight, 0.9 * old_head + 0.1 * lg.heads.local_heads[2][0].weight
    )
    assert all(not p.requires_grad for p in lg.momentum_encoder.parameters())


def test_local_global_needs_attention():
    with pytest.raises(VspaError, match="needs the attention decoder"):
        LocalGlobalLoss(tiny_translator(attention=False))


# --------------------------------------------------------------------------- config


def test_translate_config_validation():
    # parsed by vspa.config.parse_section: every key but variant is required (its value is in conf/config.yaml)
    base = translate_section()
    assert TranslateConfig.from_params(base).variant == "attention_lg"  # the default: not in params.yaml
    with pytest.raises(VspaError, match="translate.lr is not set"):
        TranslateConfig.from_params({**base, "lr": None})
    with pytest.raises(VspaError, match="unknown key.*lambda_idt"):
        TranslateConfig.from_params({**base, "lambda_idt": 1.0})
    with pytest.raises(
        VspaError, match="translate.variant 'cyclegan' is unknown. Use one of: cut, attention, attention_lg"
    ):
        TranslateConfig.from_params({**base, "variant": "cyclegan"})
    with pytest.raises(VspaError, match="crop_height must be a positive multiple of 16"):
        TranslateConfig.from_params({**base, "variant": "attention_lg", "crop_height": 72, "crop_width": 128})
    assert (
        TranslateConfig.from_params({**base, "variant": "cut", "crop_height": 72, "crop_width": 128}).crop_height == 72
    )
    assert TranslateConfig.from_params({**base, "crop_height": None, "crop_width": None}).crop_height is None
    with pytest.raises(VspaError, match="set both translate.crop_height and translate.crop_width"):
        TranslateConfig.from_params({**base, "crop_height": None})
    with pytest.raises(VspaError, match="translate.ga_warmup must be >= 0, got -1"):
        TranslateConfig.from_params({**base, "ga_warmup": -1})
    with pytest.raises(VspaError, match="translate.lr must be a number, got 'fast'"):
        TranslateConfig.from_params({**base, "lr": "fast"})


def test_lr_factor_is_constant_then_linear():
    factors = [lr_factor(s, 10) for s in range(10)]
    assert factors[:6] == [1.0] * 6
    assert factors[6:] == pytest.approx([1 - k / 6 for k in range(1, 5)])
    # the default fraction 0.5 is the schedule of before the knob (iterations // 2), for odd counts too
    assert [lr_factor(s, 7, 0.5) for s in range(7)] == pytest.approx([1, 1, 1, 1, 1 - 1 / 5, 1 - 2 / 5, 1 - 3 / 5])
    # constant for 80% of 10 steps: 1 up to step 8, then 1 - 1 / 3 at step 9
    assert [lr_factor(s, 10, 0.8) for s in range(10)] == pytest.approx([1] * 9 + [1 - 1 / 3])
    assert [lr_factor(s, 4, 0.0) for s in range(4)] == pytest.approx([1, 0.8, 0.6, 0.4])  # decays from the start


def test_lr_decay_start_is_used_and_checked():
    base = translate_section()
    assert TranslateConfig.from_params({**base, "lr_decay_start": 0.8}).lr_decay_start == 0.8
    for bad in (1.0, -0.1):
        with pytest.raises(VspaError, match=r"translate.lr_decay_start must be in \[0, 1\)"):
            TranslateConfig.from_params({**base, "lr_decay_start": bad})


# --------------------------------------------------------------------------- training, resumption, stages

STAGE_PARAMS = translate_section(tiny=True, variant="attention_lg", batch_size=1, lr=2e-4)


@pytest.fixture(scope="module")
def tiny_splits(tiny_benchmark) -> dict[str, Path]:
    """The shared tiny synth_fog benchmark (tests/conftest.py): 96x192 images, 6 train / 4 test per domain."""
    return {split: tiny_benchmark / split for split in ("source_train", "target_train", "target_test")}


def test_training_resumes_to_the_same_model(tiny_splits, tmp_path, monkeypatch):
    from vspa.translation import trainer

    cfg = TranslateConfig.from_params({**STAGE_PARAMS, "lr_decay_start": 0.25})
    args = (tiny_splits["target_train"], tiny_splits["source_train"])
    straight = trainer.train_translator(
        cfg, *args, tmp_path / "a/model.pt", tmp_path / "a/state.pt", tmp_path / "a/losses.csv", progress=False
    )
    assert straight["resumed_from"] == 0

    real_step, calls = trainer.train_step, []

    def interrupted(*a, **k):  # dies in iteration 3, after the checkpoint of iteration 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_translator(
            cfg, *args, tmp_path / "b/model.pt", tmp_path / "b/state.pt", tmp_path / "b/losses.csv", progress=False
        )
    assert not (tmp_path / "b/model.pt").exists()
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train_translator(
        cfg, *args, tmp_path / "b/model.pt", tmp_path / "b/state.pt", tmp_path / "b/losses.csv", progress=False
    )
    assert resumed["resumed_from"] == 2
    a = torch.load(tmp_path / "a/model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b/model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/losses.csv").read_text() == (tmp_path / "b/losses.csv").read_text()
    header = (tmp_path / "a/losses.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["iteration", "lr", "loss_D"] and "loss_GA_lg" in header
    # the schedule follows translate.lr_decay_start: decay from step floor(4 * 0.25) = 1, 1 - (step - 1) / 4
    lrs = [float(row.split(",")[1]) for row in (tmp_path / "a/losses.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([2e-4 * f for f in (1.0, 1.0, 0.75, 0.5)])


def test_translate_train_apply_evaluate_stages(tiny_splits, tmp_path):
    from conftest import detector_config
    from PIL import Image

    from vspa.detection import checkpoint
    from vspa.detection.model import build_detector

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "scenario": "synth_fog",
                "translate": STAGE_PARAMS,
                "evaluate": {"device": "cpu", "iou": 0.5, "batch_size": 2},
            }
        )
    )
    stage_main("translate_train")(
        params=str(params),
        variant="attention",
        seed=None,
        target=tiny_splits["target_train"],
        source=tiny_splits["source_train"],
        out_dir=tmp_path / "models",
        reports_dir=tmp_path / "reports",
    )
    assert (tmp_path / "models/attention/model.pt").is_file()
    # two rows per image (the first 4 target images), 2 px apart: input, output, 2 content maps; background
    # mask, winning mask, 2 masks (issue 17: the content maps and the winner map are new)
    grid = Image.open(tmp_path / "reports/attention_grid.png")
    assert grid.size == (4 * 192 + 3 * 2, 8 * 96 + 7 * 2)
    rows = (tmp_path / "reports/attention_losses.csv").read_text().splitlines()
    assert len(rows) == 1 + STAGE_PARAMS["iterations"] and "loss_GA" not in rows[0]
    diag = json.loads((tmp_path / "reports/attention_diagnostics.json").read_text())
    assert diag["variant"] == "attention" and diag["iterations"] == STAGE_PARAMS["iterations"]
    for when in ("init", "final"):
        assert 0 < diag[when]["mask_entropy"] <= diag[when]["mask_entropy_max"] == pytest.approx(math.log(3), abs=1e-4)
        assert 0 <= diag[when]["bg_on_objects"] <= 1 and 0 <= diag[when]["bg_off_objects"] <= 1
        assert "lg_gap" not in diag[when]  # no L_GA in this variant
    assert set(diag["losses"]) >= {"loss_D", "loss_G_GAN", "loss_NCE"} and "loss_GA" not in diag["losses"]

    stage_main("translate_apply")(
        params=str(params),
        variant="attention",
        data=tiny_splits["target_test"],
        models_dir=tmp_path / "models",
        out_dir=tmp_path / "translated",
    )
    out = tmp_path / "translated/attention/target_test"
    original = json.loads((tiny_splits["target_test"] / "annotations.json").read_text())
    translated = json.loads((out / "annotations.json").read_text())
    assert [i["id"] for i in translated["images"]] == [i["id"] for i in original["images"]]
    assert translated["annotations"] == original["annotations"]
    assert translated["info"]["translated_by"]["variant"] == "attention"
    for entry in translated["images"]:
        assert Image.open(out / entry["file_name"]).size == (192, 96)
    assert not list(out.parent.glob(".*"))  # no temporary folder left behind

    torch.manual_seed(0)
    classes = [c["name"] for c in original["categories"]]
    det_cfg = detector_config(backbone="small", small_width=8, min_size=96, max_size=192, anchor_sizes=[16, 32, 64])
    checkpoint.save(tmp_path / "source.pt", build_detector(det_cfg, len(classes)), det_cfg, classes)
    stage_main("evaluate")(
        params=str(params),
        model=tmp_path / "source.pt",
        data=out,
        name="translate_attention",
        metrics_dir=tmp_path / "metrics",
        plots_dir=tmp_path / "pr",
    )
    metrics = json.loads((tmp_path / "metrics/translate_attention.json").read_text())
    info = json.loads((tmp_path / "metrics/info/translate_attention.json").read_text())
    assert info["num_images"] == len(original["images"]) and list(metrics["AP"]) == classes


def test_translate_apply_reports_a_missing_or_foreign_model(tiny_splits, tmp_path, capsys):
    from vspa.translation.apply import translate_split

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"translate": {"device": "cpu"}}))
    with pytest.raises(SystemExit) as exit_info:  # the stage: one line on stderr, exit status 2
        stage_main("translate_apply")(
            params=str(params),
            variant="cut",
            data=tiny_splits["target_test"],
            models_dir=tmp_path / "none",
            out_dir=tmp_path / "translated",
        )
    assert exit_info.value.code == 2
    assert "none/cut/model.pt: translator not found. Run the translate_train stage" in capsys.readouterr().err
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(VspaError, match="other.pt: not a translator saved by translate_train"):
        translate_split(tmp_path / "other.pt", tiny_splits["target_test"], tmp_path / "translated")
    assert not (tmp_path / "translated").exists()
