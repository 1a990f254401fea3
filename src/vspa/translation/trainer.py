"""Training of the target -> source translator (CUT objective, optional attention and local-global loss).

One iteration (as CUT, with ``G`` run on target and source images together for the identity NCE term):

1. ``D`` step: ``0.5 [gan(D(G(a)), fake) + gan(D(b), real)]`` for target ``a`` and source ``b``;
2. ``G`` step: ``lambda_gan gan(D(G(a)), real) + lambda_nce 0.5 [NCE(a, G(a)) + NCE(b, G(b))]``
   ``+ w_ga(it) L_GA(a)`` (variant ``attention_lg`` only), ``w_ga`` rising linearly from 0 to ``lambda_ga``
   over the first ``ga_warmup`` iterations (:func:`ga_weight`).

Paired runs (issue 17). Every random draw comes from a stream seeded by ``derive_seed(seed, ..., stream)``
(:mod:`vspa.training.seeds`; a stream id per purpose, last): the initialisation of each model part
(``seed, k, _INIT``), the order of the images (``global_batch``: an epoch permutation per domain), each crop
and flip (``seed, iteration, position, _*_CROP``), the local-global views (``seed, iteration, _VIEWS``) and the
global RNG that PatchNCE samples its locations from (reseeded each iteration, ``seed, iteration, _SAMPLER``). So the
variants cut / attention / attention_lg of one seed see the same crops at every iteration (:func:`training_batch`)
and start from the same encoder and discriminator, and what an iteration draws does not depend on what the
iterations before it drew (resuming needs no RNG state).

Before the first step of ``attention_lg``, L_GA's queues and feature statistics are filled from
``queue_size`` target crops (:func:`prime_local_global`).

Adam with betas (0.5, 0.99); the learning rate is constant for the first ``lr_decay_start`` fraction of the
iterations and decays linearly to zero over the rest (0.5: CUT's 200 + 200 epochs). Training resumes from an
atomically written state file (models, optimisers, scheduler, queues, feature statistics, loss history) when its
fingerprint (config, data and the package's code) matches; anything else starts afresh
(:mod:`vspa.training.state`).
The run ends with the diagnostics of :mod:`vspa.translation.diagnostics` (mask entropy, background mask on
and off the objects, L_GA's view separation, gradient norms at initialisation) and the loss summary, written
as a small JSON (dvc metrics).

Default sizes train on a CPU in minutes; the paper's sizes for GPU nodes are the ``translate`` config group's
``paper`` option (``conf/translate/paper.yaml``: ``dvc exp run -S translate=paper``): ngf 64, n_blocks 9,
ndf 64, crops 256x512, lr 1e-5, queue_size 4096, momentum 0.999.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vspa.training.seeds import derive_seed
from vspa.training.state import code_digest, load_state, save_state
from vspa.translation.config import LG_GRID, TranslateConfig
from vspa.translation.data import (
    _DIAG,
    _INIT,
    _PRIME,
    _SAMPLER,
    UnpairedImages,
    read_image,
    stream,
    training_batch,
    views_generator,
)
from vspa.translation.discriminator import PatchDiscriminator
from vspa.translation.generator import Translator, default_nce_layers
from vspa.translation.losses import GANLoss, PatchNCELoss
from vspa.translation.local_global import LocalGlobalLoss
from vspa.utils import (
    VspaError,
    atomic_path,
    get_device,
    save_torch_atomic,
    seed_everything,
    sha256_file,
    sha256_json,
    write_json_atomic,
)

ADAM_BETAS = (0.5, 0.99)
STATE_FORMAT = "vspa-translator-state/2"  # 2: seeded streams, no RNG state; L_GA feature statistics
MODEL_FORMAT = "vspa-translator/1"
PROGRESS_KEYS = ("loss_D", "loss_G_GAN", "loss_NCE", "loss_GA")


def prime_local_global(models: "TranslationModels", targets: UnpairedImages, cfg: TranslateConfig, device) -> int:
    """Fill L_GA's queues and feature statistics from ``queue_size`` target crops (their own streams, id
    ``_PRIME``) before the first step (:meth:`LocalGlobalLoss.prime`)."""
    n_batches = -(-cfg.queue_size // cfg.batch_size)
    batches = (targets.sample(cfg.batch_size, cfg.seed, k, _PRIME, _PRIME).to(device) for k in range(n_batches))
    return models.local_global.prime(models.generator, batches, stream(cfg.seed, _PRIME))


def ga_weight(cfg: TranslateConfig, iteration: int) -> float:
    """L_GA's weight at 0-based ``iteration``: ``lambda_ga * min(1, iteration / ga_warmup)``."""
    if cfg.ga_warmup <= 0:
        return cfg.lambda_ga
    return cfg.lambda_ga * min(1.0, iteration / cfg.ga_warmup)


# --------------------------------------------------------------------------- models and one step


class TranslationModels(torch.nn.Module):
    """Everything that trains: G, D, the PatchNCE MLPs and (attention_lg) the local-global loss state."""

    def __init__(self, cfg: TranslateConfig):
        """Each part is initialised from its own stream ``(seed, k, _INIT)``: every variant of one seed starts with
        the same encoder, discriminator and PatchNCE heads."""
        super().__init__()
        torch.manual_seed(derive_seed(cfg.seed, 0, _INIT))
        self.generator = Translator(cfg.translator_config())
        torch.manual_seed(derive_seed(cfg.seed, 1, _INIT))
        self.discriminator = PatchDiscriminator(cfg.ndf)
        torch.manual_seed(derive_seed(cfg.seed, 2, _INIT))
        self.nce = PatchNCELoss(
            self.generator.encoder, default_nce_layers(cfg.n_blocks), cfg.num_patches, tau=cfg.nce_tau
        )
        torch.manual_seed(derive_seed(cfg.seed, 3, _INIT))
        self.local_global = (
            LocalGlobalLoss(
                self.generator, grid=LG_GRID, queue_size=cfg.queue_size, momentum=cfg.momentum, tau=cfg.ga_tau
            )
            if cfg.local_global
            else None
        )

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.generator.parameters()) + list(self.nce.parameters())
        if self.local_global is not None:
            params += list(self.local_global.heads.parameters())
        return params


def lr_factor(step: int, iterations: int, decay_start_fraction: float = 0.5) -> float:
    """``1 - max(0, step - d) / (iterations - d + 1)`` with ``d = floor(iterations * decay_start_fraction)``: 1 up
    to step ``d``, then linearly towards 0 (0.5: the first half constant, CUT's schedule; 0.0: decay throughout)."""
    decay_start = int(iterations * decay_start_fraction)
    return 1.0 - max(0, step - decay_start) / (iterations - decay_start + 1)


def train_step(
    models: TranslationModels,
    gan: GANLoss,
    opt_g,
    opt_d,
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    cfg: TranslateConfig,
    ga_weight: float | None = None,
    views_rng: torch.Generator | None = None,
) -> dict[str, float]:
    """One D step and one G step; returns the losses of this iteration. ``ga_weight``: L_GA's weight (default
    ``cfg.lambda_ga``); ``views_rng``: the generator of the local-global views (default: the global RNG)."""
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
    out = {
        "loss_D": loss_d.item(),
        "loss_G_GAN": loss_gan.item(),
        "loss_NCE": loss_nce.item(),
        "loss_NCE_Y": loss_nce_y.item(),
    }
    if models.local_global is not None:
        weight = cfg.lambda_ga if ga_weight is None else ga_weight
        loss_ga, terms = models.local_global(g, real_a, views_rng)
        total = total + weight * loss_ga
        out.update({"loss_GA": loss_ga.item(), **{f"loss_GA_{k}": v for k, v in terms.items()}, "w_GA": weight})
    total.backward()
    opt_g.step()
    return out


# --------------------------------------------------------------------------- the training run


def fingerprint(cfg: TranslateConfig, target_dir: Path, source_dir: Path) -> str:
    """Identifies a run: the config (except device and checkpoint_every), both splits' annotations and the
    package's code (``code_digest``: a state written by other code is not resumed)."""
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "checkpoint_every")}
    data = [sha256_file(Path(d) / "annotations.json") for d in (target_dir, source_dir)]
    return sha256_json({"config": relevant, "data": data, "format": STATE_FORMAT, "code": code_digest()})


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


def _save_state(path, models, opt_g, opt_d, sched_g, sched_d, iteration, history, fp, init_diag) -> None:
    save_state(
        path,
        STATE_FORMAT,
        fp,
        iteration,
        {
            "models": models.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "sched_g": sched_g.state_dict(),
            "sched_d": sched_d.state_dict(),
            "history": history,
            "init_diagnostics": init_diag,
        },
    )


def save_model(path: str | os.PathLike, generator: Translator, cfg: TranslateConfig, iterations: int) -> None:
    """The translator alone (what ``translate_apply`` loads), written atomically."""
    save_torch_atomic(
        {
            "format": MODEL_FORMAT,
            "variant": cfg.variant,
            "translator": generator.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
            "iterations": iterations,
            "train_config": cfg.to_dict(),
        },
        path,
    )


def train_translator(
    cfg: TranslateConfig,
    target_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    state_path: str | os.PathLike,
    losses_csv: str | os.PathLike,
    grid_png: str | os.PathLike | None = None,
    diagnostics_json: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train G on unpaired target (``target_dir``) and source (``source_dir``) images; write the model,
    the loss CSV and (optionally) the grid PNG and the diagnostics JSON. Resumes from ``state_path`` when it
    matches this run.

    Returns ``{"iterations", "resumed_from", "seconds_per_iteration", "final_losses", "diagnostics"}``.
    """
    from vspa.translation.diagnostics import DiagnosticImages, gradient_norms, run_diagnostics
    from vspa.translation.grid import save_translation_grid

    target_dir, source_dir, state_path = Path(target_dir), Path(source_dir), Path(state_path)
    device = get_device(cfg.device)
    crop = None if cfg.crop_height is None else (cfg.crop_height, cfg.crop_width)
    targets = UnpairedImages(target_dir, crop, cfg.size_multiple)
    sources = UnpairedImages(source_dir, crop, cfg.size_multiple)
    diag_images = DiagnosticImages(target_dir, crop, cfg.size_multiple)
    fp = fingerprint(cfg, target_dir, source_dir)

    seed_everything(cfg.seed)
    models = TranslationModels(cfg).to(device)
    gan = GANLoss(cfg.gan_mode)
    opt_g = torch.optim.Adam(models.generator_parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    opt_d = torch.optim.Adam(models.discriminator.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    schedule = lambda step: lr_factor(step, cfg.iterations, cfg.lr_decay_start)  # noqa: E731
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule)
    start, history, init_diag = 0, [], None

    state = load_state(state_path, STATE_FORMAT, fp, f"translate {cfg.variant}")
    if state is not None:
        models.load_state_dict(state["models"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched_g.load_state_dict(state["sched_g"])
        sched_d.load_state_dict(state["sched_d"])
        start, history, init_diag = int(state["iteration"]), list(state["history"]), state["init_diagnostics"]
        tqdm.write(f"translate: resuming {cfg.variant} from iteration {start} ({state_path})")
    if start == 0 and models.local_global is not None:
        prime_local_global(models, targets, cfg, device)
    if init_diag is None:  # the models as they start (L_GA primed), the first batch
        first_a, first_b = (x.to(device) for x in training_batch(targets, sources, cfg, 0))
        torch.manual_seed(derive_seed(cfg.seed, 0, _SAMPLER))
        init_diag = {
            **run_diagnostics(models, diag_images, derive_seed(cfg.seed, _DIAG), device),
            **gradient_norms(models, first_a, first_b, cfg.lambda_nce, cfg.lambda_ga, views_generator(cfg, 0)),
        }

    models.train()
    resumed_from, step_times = start, []
    bar = tqdm(
        range(start, cfg.iterations),
        initial=start,
        total=cfg.iterations,
        desc=f"translate {cfg.variant}",
        unit="it",
        disable=None if progress else True,
    )
    for it in bar:
        t0 = time.perf_counter()
        real_a, real_b = (x.to(device) for x in training_batch(targets, sources, cfg, it))
        torch.manual_seed(derive_seed(cfg.seed, it, _SAMPLER))  # PatchNCE's locations
        losses = train_step(
            models, gan, opt_g, opt_d, real_a, real_b, cfg, ga_weight(cfg, it), views_generator(cfg, it)
        )
        lr = opt_g.param_groups[0]["lr"]
        sched_g.step()
        sched_d.step()
        step_times.append(time.perf_counter() - t0)
        if not all(math.isfinite(v) for v in losses.values()):
            raise VspaError(
                f"translate {cfg.variant}: non-finite loss at iteration {it + 1} ({losses}); lower translate.lr."
            )
        history.append({"iteration": it + 1, "lr": lr, **losses})
        bar.set_postfix({k[5:]: f"{losses[k]:.3f}" for k in PROGRESS_KEYS if k in losses})
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            _save_state(state_path, models, opt_g, opt_d, sched_g, sched_d, it + 1, history, fp, init_diag)
            write_losses_csv(losses_csv, history)
    _save_state(state_path, models, opt_g, opt_d, sched_g, sched_d, cfg.iterations, history, fp, init_diag)
    write_losses_csv(losses_csv, history)
    save_model(model_path, models.generator, cfg, cfg.iterations)
    if grid_png is not None:
        save_translation_grid(models.generator, [read_image(p) for p in targets.paths[:4]], grid_png, device)
    diagnostics = {
        "variant": cfg.variant,
        "iterations": cfg.iterations,
        "images": len(diag_images),
        "init": init_diag,
        "final": run_diagnostics(models, diag_images, derive_seed(cfg.seed, _DIAG), device),
        "losses": loss_summary(history),
    }
    if diagnostics_json is not None:
        write_json_atomic(diagnostics_json, diagnostics)
    return {
        "iterations": cfg.iterations,
        "resumed_from": resumed_from,
        "seconds_per_iteration": min(step_times) if step_times else None,
        "final_losses": history[-1] if history else {},
        "diagnostics": diagnostics,
    }


def loss_summary(
    history: list[dict], keys: tuple[str, ...] = ("loss_D", "loss_G_GAN", "loss_NCE", "loss_NCE_Y", "loss_GA")
) -> dict[str, dict[str, float]]:
    """Per loss: its mean over the first and over the last 10 % of the iterations (at least one each)."""
    n = max(1, len(history) // 10)
    out = {}
    for key in keys:
        values = [row[key] for row in history if key in row]
        if values:
            out[key] = {
                "first_10pct": round(sum(values[:n]) / len(values[:n]), 4),
                "last_10pct": round(sum(values[-n:]) / len(values[-n:]), 4),
            }
    return out
