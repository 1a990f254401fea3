"""Can the background discriminator learn the domain from the source model's features, and how fast?

Offline probe behind the README's "Does the alignment act?": the background features of the source model
(``models/source/model.pt``) on source train (the full memory, ``models/memory/full.h5``) and on target
train (extracted here), L2-normalised as in training. A fresh ``FeatureDiscriminator`` is trained as the
adaptation trainer trains it (SGD lr 0.01, momentum 0.9, weight decay 1e-4, 2 source + 2 target samples per
step, each target paired with its nearest memory entry), with the inputs multiplied by ``scale``; held-out
accuracy (the last 100 target images, never trained on, each with its nearest training-source entry) every 100 steps, mean loss per 100 steps.
No detector update: this isolates the discriminator's own learning speed.

    python benchmarks/probe_bg_disc.py      # -> reports/bench/bg_disc_probe.{json,md}, about 1 min on 1 thread
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SCALES = (1.0, 2.0, 4.0, 8.0, 32.0)
STEPS, HELD_OUT = 600, 100


def main() -> None:
    from vspa.adaptation.losses import FeatureDiscriminator
    from vspa.data.coco import DetectionDataset
    from vspa.detection import checkpoint
    from vspa.memory.extract import extract_memory
    from vspa.memory.store import open_memory

    torch.set_num_threads(1)
    out_dir = ROOT / "reports" / "bench"
    target_path = ROOT / "models" / "probe" / "target_train_memory.h5"
    target_path.parent.mkdir(parents=True, exist_ok=True)
    detector, _ = checkpoint.load(ROOT / "models" / "source" / "model.pt")
    extract_memory(
        detector, DetectionDataset(ROOT / "data/benchmark/target_train/annotations.json"), target_path, progress=False
    )
    source = F.normalize(torch.as_tensor(np.asarray(open_memory(ROOT / "models/memory/full.h5").bg_features)), dim=1)
    target = F.normalize(torch.as_tensor(np.asarray(open_memory(target_path).bg_features)), dim=1)
    src_train = source[:-HELD_OUT]  # the held-out source rows are not used by the probe
    tgt_train, tgt_test = target[:-HELD_OUT], target[-HELD_OUT:]
    cosine_of_means = float(F.cosine_similarity(source.mean(0), target.mean(0), dim=0))

    results = []
    for scale in SCALES:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        disc = FeatureDiscriminator(source.shape[1])
        opt = torch.optim.SGD(disc.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        losses, accuracy = [], []
        for step in range(STEPS):
            tgt = tgt_train[torch.randint(0, len(tgt_train), (2,), generator=g)]
            src = src_train[(tgt @ src_train.T).argmax(dim=1)]  # the nearest memory entry, as in training
            ls, lt = disc(src * scale), disc(tgt * scale)
            loss = F.binary_cross_entropy_with_logits(ls, torch.zeros_like(ls)) + F.binary_cross_entropy_with_logits(
                lt, torch.ones_like(lt)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 100 == 0:
                with torch.no_grad():
                    near = src_train[(tgt_test @ src_train.T).argmax(dim=1)]
                    acc = 0.5 * float((disc(near * scale) < 0).float().mean()) + 0.5 * float(
                        (disc(tgt_test * scale) > 0).float().mean()
                    )
                accuracy.append(round(acc, 3))
        results.append(
            {
                "scale": scale,
                "held_out_accuracy_every_100": accuracy,
                "mean_loss_per_100": [round(float(np.mean(losses[k : k + 100])), 3) for k in range(0, STEPS, 100)],
            }
        )

    doc = {"cosine_of_domain_means": round(cosine_of_means, 4), "steps": STEPS, "results": results}
    (out_dir / "bg_disc_probe.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Background discriminator probe (`python benchmarks/probe_bg_disc.py`)",
        "",
        f"Source-model background features, source train vs target train; cosine of the domain means "
        f"{cosine_of_means:.3f}. Discriminator trained alone (no detector update), 2 + 2 samples per step, each "
        "target paired with its nearest source entry; held-out: the last 100 target images with their nearest "
        "training-source entries. Loss 1.386 = chance.",
        "",
        "| input scale | mean loss, steps 1-100 / 101-200 / 201-300 / ... | held-out accuracy at 100 / 200 / 300 / ... |",
        "|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scale']:g} | {' / '.join(f'{v:.2f}' for v in r['mean_loss_per_100'])} "
            f"| {' / '.join(f'{v:.2f}' for v in r['held_out_accuracy_every_100'])} |"
        )
    (out_dir / "bg_disc_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
