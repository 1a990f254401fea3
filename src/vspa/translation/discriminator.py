"""PatchGAN discriminator (pix2pix / CUT ``NLayerDiscriminator``): one real/fake logit per receptive field."""

from __future__ import annotations

import torch
from torch import nn

from vspa.translation.generator import init_weights


class PatchDiscriminator(nn.Module):
    """conv4/s2 + LeakyReLU, ``n_layers - 1`` conv4/s2 + IN + LeakyReLU, conv4/s1 + IN + LeakyReLU, conv4/s1 -> 1.

    With ``n_layers = 3`` every output logit sees a 70x70 patch of the input. ``ndf`` = 64 in the paper.
    """

    def __init__(self, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
