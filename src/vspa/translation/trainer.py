"""Training of the target -> source translator (CUT objective, optional attention and local-global loss).

One iteration (as CUT, with ``G`` run on target and source images together for the identity NCE term):

1. ``D`` step: ``0.5 [gan(D(G(a)), fake) + gan(D(b), real)]`` for target ``a`` and source ``b``;
2. ``G`` step: ``lambda_gan gan(D(G(a)), real) + lambda_nce 0.5 [NCE(a, G(a)) + NCE(b, G(b))]``
   ``+ lambda_ga L_GA(a)`` (variant ``attention_lg`` only).

Adam with betas (0.5, 0.99); the learning rate is constant for the first half of the iterations and decays
linearly to zero over the second half (CUT's 200 + 200 epochs). Training resumes from an atomically written
state file (models, optimisers, scheduler, queues, RNG state, loss history) when its fingerprint (config and
data) matches; a different fingerprint starts afresh.

Default sizes train on a CPU in minutes; the paper's sizes for GPU nodes: ngf 64, n_blocks 9, n_content 9,
ndf 64, crop 256x512 or larger, batch_size 1, lr 1e-5 (2e-4 for short runs), queue_size 4096, momentum 0.999.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vspa.translation.discriminator import PatchDiscriminator
from vspa.translation.generator import Translator, TranslatorConfig, default_nce_layers
from vspa.translation.losses import GAN_MODES, GANLoss, PatchNCELoss
from vspa.translation.local_global import LocalGlobalLoss
from vspa.utils import (
    VspaError,
    atomic_path,
    get_device,
    rng_state,
    save_torch_atomic,
    seed_everything,
    set_rng_state,
    sha256_file,
    sha256_json,
)

VARIANTS = {"cut": (False, False), "attention": (True, False), "attention_lg": (True, True)}  # (attention, L_GA)
ADAM_BETAS = (0.5, 0.99)
STATE_FORMAT = "vspa-translator-state/1"
MODEL_FORMAT = "vspa-translator/1"
LG_GRID = 4
PROGRESS_KEYS = ("loss_D", "loss_G_GAN", "loss_NCE", "loss_GA")


@dataclass(frozen=True)
class TranslateConfig:
    """The ``translate:`` params section (every key optional; these are the defaults)."""

    variant: str = "attention_lg"
    iterations: int = 1000
    batch_size: int = 1
    lr: float = 2e-4
    crop_height: int | None = 64  # None: the full image
    crop_width: int | None = 128
    ngf: int = 16
    n_blocks: int = 2
    n_content: int = 9
    ndf: int = 32
    gan_mode: str = "lsgan"
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    lambda_ga: float = 1.0
    num_patches: int = 256
    nce_tau: float = 0.07
    queue_size: int = 256
    momentum: float = 0.99
    ga_tau: float = 0.2
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 200

    @classmethod
    def from_section(cls, section: dict, path: str = "params.yaml") -> "TranslateConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise VspaError(f"{path}: unknown key(s) translate.{', translate.'.join(unknown)}. "
                            f"Known keys: {', '.join(sorted(known))}.")
        values = {k: v for k, v in section.items() if v is not None or k in ("crop_height", "crop_width")}
        try:
            cfg = cls(**values)
        except TypeError as exc:
            raise VspaError(f"{path}: translate section: {exc}.") from exc
        cfg.validate(path)
        return cfg

    def validate(self, path: str = "params.yaml") -> None:
        if self.variant not in VARIANTS:
            raise VspaError(f"{path}: translate.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        if self.gan_mode not in GAN_MODES:
            raise VspaError(f"{path}: translate.gan_mode must be one of {', '.join(GAN_MODES)}, got {self.gan_mode!r}.")
        for key in ("iterations", "batch_size", "ngf", "n_blocks", "n_content", "ndf", "num_patches",
                    "queue_size", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VspaError(f"{path}: translate.{key} must be a positive integer, got {value!r}.")
        for key in ("lr", "nce_tau", "ga_tau"):
            if not float(getattr(self, key)) > 0:
                raise VspaError(f"{path}: translate.{key} must be positive, got {getattr(self, key)!r}.")
        if not 0.0 <= float(self.momentum) < 1.0:
            raise VspaError(f"{path}: translate.momentum must be in [0, 1), got {self.momentum!r}.")
        if (self.crop_height is None) != (self.crop_width is None):
            raise VspaError(f"{path}: set both translate.crop_height and translate.crop_width, or both to null.")
        if self.crop_height is not None:
            step = self.size_multiple
            for key in ("crop_height", "crop_width"):
                value = getattr(self, key)
                if not isinstance(value, int) or value < step or value % step:
                    raise VspaError(f"{path}: translate.{key} must be a positive multiple of {step} "
                                    f"(variant {self.variant}), got {value!r}.")

    @property
    def attention(self) -> bool:
        return VARIANTS[self.variant][0]

    @property
    def local_global(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def size_multiple(self) -> int:
        """Training crops: multiples of 4 (two stride-2 convs), of 16 with L_GA (a 4x4 grid of such patches)."""
        return 4 * LG_GRID if self.local_global else 4

    def translator_config(self) -> TranslatorConfig:
        return TranslatorConfig(attention=self.attention, ngf=self.ngf, n_blocks=self.n_blocks, n_content=self.n_content)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- images


def image_paths(split_dir: str | os.PathLike) -> list[Path]:
    """The image files of a split folder (``annotations.json``), in the order of its ``images`` list."""
    from vspa.data.coco import load_coco

    json_path = Path(split_dir) / "annotations.json"
    if not json_path.is_file():
        raise VspaError(f"{json_path}: annotations not found. Run the prepare stage or fix the split folder.")
    data = load_coco(json_path)
    if not data.images:
        raise VspaError(f"{json_path}: no images. The translator needs at least one image per domain.")
    return [data.image_path(img) for img in data.images]


def read_image(path: Path) -> torch.Tensor:
    """RGB image as ``[3, H, W]`` float in [-1, 1]."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise VspaError(f"{path}: unreadable image ({exc}). Regenerate the split or remove the image.") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class UnpairedImages:
    """Random batches of random crops (and horizontal flips) of one domain's images, from the global RNG."""

    def __init__(self, split_dir: str | os.PathLike, crop: tuple[int, int] | None, multiple: int):
        self.split_dir = Path(split_dir)
        self.paths = image_paths(split_dir)
        self.crop = crop
        self.multiple = multiple

    def __len__(self) -> int:
        return len(self.paths)

    def _crop(self, image: torch.Tensor, path: Path) -> torch.Tensor:
        _, h, w = image.shape
        if self.crop is None:
            if h % self.multiple or w % self.multiple:
                raise VspaError(f"{path}: a {h}x{w} image is not a multiple of {self.multiple}; set "
                                f"translate.crop_height / crop_width to train on crops.")
            return image
        ch, cw = self.crop
        if h < ch or w < cw:
            raise VspaError(f"{path}: image {h}x{w} is smaller than the crop {ch}x{cw}; lower "
                            f"translate.crop_height / crop_width.")
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return image[:, top : top + ch, left : left + cw]

    def sample(self, batch_size: int) -> torch.Tensor:
        crops = []
        for i in torch.randint(0, len(self.paths), (batch_size,)).tolist():
            crop = self._crop(read_image(self.paths[i]), self.paths[i])
            crops.append(crop.flip(-1) if torch.rand(()).item() < 0.5 else crop)
        if len({tuple(c.shape) for c in crops}) > 1:
            raise VspaError(f"{self.split_dir}: images of different sizes in one batch; set "
                            f"translate.crop_height / crop_width (or batch_size: 1).")
        return torch.stack(crops)


# --------------------------------------------------------------------------- models and one step


class TranslationModels(torch.nn.Module):
    """Everything that trains: G, D, the PatchNCE MLPs and (attention_lg) the local-global loss state."""

    def __init__(self, cfg: TranslateConfig):
        super().__init__()
        self.generator = Translator(cfg.translator_config())
        self.discriminator = PatchDiscriminator(cfg.ndf)
        self.nce = PatchNCELoss(self.generator.encoder, default_nce_layers(cfg.n_blocks), cfg.num_patches, tau=cfg.nce_tau)
        self.local_global = (
            LocalGlobalLoss(self.generator, grid=LG_GRID, queue_size=cfg.queue_size, momentum=cfg.momentum, tau=cfg.ga_tau)
            if cfg.local_global else None
        )

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.generator.parameters()) + list(self.nce.parameters())
        if self.local_global is not None:
            params += list(self.local_global.heads.parameters())
        return params


def lr_factor(step: int, iterations: int) -> float:
    """1 for the first half of training, then linearly down to ``1 / (n + 1)`` at the last step."""
    decay_start = iterations // 2
    return 1.0 - max(0, step - decay_start) / (iterations - decay_start + 1)


def train_step(models: TranslationModels, gan: GANLoss, opt_g, opt_d, real_a: torch.Tensor, real_b: torch.Tensor,
               cfg: TranslateConfig) -> dict[str, float]:
    """One D step and one G step; returns the losses of this iteration."""
    g, d = models.generator, models.discriminator
    n = real_a.shape[0]
    fake = g(torch.cat([real_a, real_b]))
    fake_b, idt_b = fake[:n], fake[n:]

    d.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    loss_d = 0.5 * (gan(d(fake_b.detach()), False) + gan(d(real_b), True))
    loss_d.backward()
    opt_d.step()

    d.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    loss_gan = gan(d(fake_b), True)
    loss_nce = models.nce(g.encoder, real_a, fake_b)
    loss_nce_y = models.nce(g.encoder, real_b, idt_b)
    total = cfg.lambda_gan * loss_gan + cfg.lambda_nce * 0.5 * (loss_nce + loss_nce_y)
    out = {"loss_D": loss_d.item(), "loss_G_GAN": loss_gan.item(), "loss_NCE": loss_nce.item(),
           "loss_NCE_Y": loss_nce_y.item()}
    if models.local_global is not None:
        loss_ga, terms = models.local_global(g, real_a)
        total = total + cfg.lambda_ga * loss_ga
        out.update({"loss_GA": loss_ga.item(), **{f"loss_GA_{k}": v for k, v in terms.items()}})
    total.backward()
    opt_g.step()
    return out


# --------------------------------------------------------------------------- the training run


def fingerprint(cfg: TranslateConfig, target_dir: Path, source_dir: Path) -> str:
    """Identifies a run: the config (except device and checkpoint_every) and both splits' annotations."""
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "checkpoint_every")}
    data = [sha256_file(Path(d) / "annotations.json") for d in (target_dir, source_dir)]
    return sha256_json({"config": relevant, "data": data, "format": STATE_FORMAT})


def write_losses_csv(path: str | os.PathLike, history: list[dict]) -> None:
    """The loss history as CSV (one row per iteration, for ``dvc plots``), written atomically."""
    columns = list(history[0]) if history else ["iteration"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _save_state(path, models, opt_g, opt_d, sched_g, sched_d, iteration, history, fp) -> None:
    save_torch_atomic({
        "format": STATE_FORMAT, "fingerprint": fp, "iteration": iteration, "models": models.state_dict(),
        "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "sched_g": sched_g.state_dict(),
        "sched_d": sched_d.state_dict(), "history": history, "rng": rng_state(),
    }, path)


def save_model(path: str | os.PathLike, generator: Translator, cfg: TranslateConfig, iterations: int) -> None:
    """The translator alone (what ``translate_apply`` loads), written atomically."""
    save_torch_atomic({
        "format": MODEL_FORMAT, "variant": cfg.variant, "translator": generator.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "iterations": iterations, "train_config": cfg.to_dict(),
    }, path)


def train_translator(cfg: TranslateConfig, target_dir: str | os.PathLike, source_dir: str | os.PathLike,
                     model_path: str | os.PathLike, state_path: str | os.PathLike,
                     losses_csv: str | os.PathLike, grid_png: str | os.PathLike | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train G on unpaired target (``target_dir``) and source (``source_dir``) images; write the model,
    the loss CSV and (optionally) the grid PNG. Resumes from ``state_path`` when it matches this run.

    Returns ``{"iterations", "resumed_from", "seconds_per_iteration", "final_losses"}``.
    """
    from vspa.translation.grid import save_translation_grid

    target_dir, source_dir, state_path = Path(target_dir), Path(source_dir), Path(state_path)
    device = get_device(cfg.device)
    crop = None if cfg.crop_height is None else (cfg.crop_height, cfg.crop_width)
    targets = UnpairedImages(target_dir, crop, cfg.size_multiple)
    sources = UnpairedImages(source_dir, crop, cfg.size_multiple)
    fp = fingerprint(cfg, target_dir, source_dir)

    seed_everything(cfg.seed)
    models = TranslationModels(cfg).to(device)
    gan = GANLoss(cfg.gan_mode)
    opt_g = torch.optim.Adam(models.generator_parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(models.discriminator.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    schedule = lambda step: lr_factor(step, cfg.iterations)  # noqa: E731
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule)
    start, history = 0, []

    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a damaged file
            raise VspaError(f"{state_path}: unreadable training state ({exc}). Delete it to train afresh.") from exc
        if state.get("format") == STATE_FORMAT and state.get("fingerprint") == fp:
            models.load_state_dict(state["models"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            sched_g.load_state_dict(state["sched_g"])
            sched_d.load_state_dict(state["sched_d"])
            start, history = int(state["iteration"]), list(state["history"])
            set_rng_state(state["rng"])
            tqdm.write(f"translate: resuming {cfg.variant} from iteration {start} ({state_path})")
        else:
            tqdm.write(f"translate: {state_path} belongs to another config or dataset; starting afresh")

    models.train()
    resumed_from, step_times = start, []
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"translate {cfg.variant}",
               unit="it", disable=None if progress else True)
    for it in bar:
        t0 = time.perf_counter()
        real_a = targets.sample(cfg.batch_size).to(device)
        real_b = sources.sample(cfg.batch_size).to(device)
        losses = train_step(models, gan, opt_g, opt_d, real_a, real_b, cfg)
        lr = opt_g.param_groups[0]["lr"]
        sched_g.step()
        sched_d.step()
        step_times.append(time.perf_counter() - t0)
        if not all(math.isfinite(v) for v in losses.values()):
            raise VspaError(f"translate {cfg.variant}: non-finite loss at iteration {it + 1} ({losses}); "
                            f"lower translate.lr.")
        history.append({"iteration": it + 1, "lr": lr, **losses})
        bar.set_postfix({k[5:]: f"{losses[k]:.3f}" for k in PROGRESS_KEYS if k in losses})
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            _save_state(state_path, models, opt_g, opt_d, sched_g, sched_d, it + 1, history, fp)
            write_losses_csv(losses_csv, history)
    _save_state(state_path, models, opt_g, opt_d, sched_g, sched_d, cfg.iterations, history, fp)
    write_losses_csv(losses_csv, history)
    save_model(model_path, models.generator, cfg, cfg.iterations)
    if grid_png is not None:
        save_translation_grid(models.generator, [read_image(p) for p in targets.paths[:4]], grid_png, device)
    return {
        "iterations": cfg.iterations,
        "resumed_from": resumed_from,
        "seconds_per_iteration": min(step_times) if step_times else None,
        "final_losses": history[-1] if history else {},
    }
