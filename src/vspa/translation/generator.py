"""The translator G: a ResNet encoder and either one RGB decoder (CUT-like) or two decoders (attention-guided).

Encoder E: conv7 (stride 1) -> two stride-2 convs -> residual blocks, instance norm + ReLU (as CUT's
ResnetGenerator). Attention-guided decoders on E's output (spec: local-global-i2i.md):

- content G_C: two upsampling layers, conv7 to ``3 n`` channels, tanh: ``n`` RGB content maps ``C_t``;
- attention G_A: two upsampling layers, 1x1 conv to ``n + 1`` channels, softmax over channels: ``n``
  foreground masks ``A_t`` and one background mask ``A_{n+1}``;
- output ``G(x) = sum_t C_t * A_t + x * A_{n+1}``.

Initialisation: CUT's (Xavier-normal, gain 0.02, zero biases) everywhere except G_A's mask head. With gain
0.02 every mask logit starts at ~0, so all ``n + 1`` masks start equal (1 / (n + 1) at every pixel) and
receive the same gradient: the masks never split (issue 17). The mask head therefore starts with
Xavier-normal gain :data:`MASK_GAIN` and each output's weights centred over its inputs (so the logits vary
from pixel to pixel with E's features while no mask starts with a larger share on every image), and the
background logit starts at :data:`BACKGROUND_BIAS`: the translator starts by re-synthesising the image
from the content maps (background mask ~0.01) rather than by copying its input. At the CPU size on
fog images this gives a per-pixel mask entropy of ~1.9 nats (of ln 10 = 2.30) at initialisation.

With ``attention=False`` the generator is the plain ResNet generator (two upsampling layers, conv7 to RGB,
tanh). Images are in ``[-1, 1]`` inside the translator; height and width must be multiples of 4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from vspa.utils import VspaError


@dataclass(frozen=True)
class TranslatorConfig:
    """Sizes of the translator. Defaults: the CPU size; the paper's: ngf 64, n_blocks 9, n_content 9."""

    attention: bool = True
    ngf: int = 16
    n_blocks: int = 2
    n_content: int = 9

    def __post_init__(self):
        for key in ("ngf", "n_blocks", "n_content"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise VspaError(f"translator config: '{key}' must be a positive integer, got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Reflection pad + conv + instance norm + ReLU."""
    pad = kernel // 2 if stride == 1 else 0
    layers: list[nn.Module] = []
    if stride == 1:
        layers.append(nn.ReflectionPad2d(pad))
        layers.append(nn.Conv2d(c_in, c_out, kernel))
    else:  # CUT's (no-antialias) downsampling: zero-padded stride-2 conv
        layers.append(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2))
    layers += [_norm(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Nearest 2x upsampling + conv3 + instance norm + ReLU (avoids transposed-conv checkerboards)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *_conv_block(c_in, c_out, 3))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """E: stem conv7, two stride-2 convs, residual blocks.

    Feature taps (for PatchNCE): 0 = the input image, 1 = stem, 2 = first downsampling, 3 = second
    downsampling, ``3 + k`` = after residual block ``k`` (1-based). ``tap_channels[i]`` is tap i's width.
    """

    def __init__(self, ngf: int, n_blocks: int):
        super().__init__()
        self.stem = _conv_block(3, ngf, 7)
        self.down1 = _conv_block(ngf, 2 * ngf, 3, stride=2)
        self.down2 = _conv_block(2 * ngf, 4 * ngf, 3, stride=2)
        self.blocks = nn.ModuleList(ResidualBlock(4 * ngf) for _ in range(n_blocks))
        self.tap_channels = [3, ngf, 2 * ngf, 4 * ngf] + [4 * ngf] * n_blocks
        self.out_channels = 4 * ngf

    def forward(self, x: torch.Tensor, taps: Sequence[int] | None = None):
        """E(x); with ``taps`` returns ``(E(x), [feature at each tap])`` instead."""
        feats = [x]
        h = self.stem(x)
        feats.append(h)
        h = self.down1(h)
        feats.append(h)
        h = self.down2(h)
        feats.append(h)
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        if taps is None:
            return h
        return h, [feats[i] for i in taps]


def default_nce_layers(n_blocks: int) -> list[int]:
    """CUT's choice scaled to any depth: input, stem, first downsampling, residual blocks 1 and ~5/9 of the way."""
    middle = 3 + math.ceil(n_blocks * 5 / 9)
    return sorted({0, 1, 2, 4, middle})


class RGBDecoder(nn.Module):
    """Plain decoder (CUT-like generator): two upsampling layers, conv7 to ``out_channels``, tanh."""

    def __init__(self, ngf: int, out_channels: int):
        super().__init__()
        self.up1 = _up_block(4 * ngf, 2 * ngf)
        self.up2 = _up_block(2 * ngf, ngf)
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.up2(self.up1(h)))


class AttentionDecoder(nn.Module):
    """G_A: two upsampling layers, 1x1 conv to ``n + 1`` logits, softmax over channels."""

    def __init__(self, ngf: int, n_content: int):
        super().__init__()
        self.up1 = _up_block(4 * ngf, 2 * ngf)
        self.up2 = _up_block(2 * ngf, ngf)
        self.logits = nn.Conv2d(ngf, n_content + 1, 1)
        # widths of the three G_A layers that the local-global loss supervises (up1, up2, logits)
        self.feature_channels = [2 * ngf, ngf, n_content + 1]

    def forward(self, h: torch.Tensor, return_features: bool = False):
        """Masks ``[B, n+1, H, W]`` (sum to one over channels); with ``return_features`` also the
        three supervised layers ``[up1, up2, logits]``."""
        u1 = self.up1(h)
        u2 = self.up2(u1)
        logits = self.logits(u2)
        masks = torch.softmax(logits, dim=1)
        if return_features:
            return masks, [u1, u2, logits]
        return masks


class TranslatorOutput(NamedTuple):
    image: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    content: torch.Tensor | None  # [B, n, 3, H, W] content maps (attention only)
    masks: torch.Tensor | None  # [B, n+1, H, W], the last one is the background (attention only)


def compose(content: torch.Tensor, masks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_t C_t * A_t + x * A_{n+1}`` for content ``[B, n, 3, H, W]``, masks ``[B, n+1, H, W]``, x ``[B, 3, H, W]``."""
    foreground = (content * masks[:, :-1, None]).sum(dim=1)
    return foreground + x * masks[:, -1:, :, :]


class Translator(nn.Module):
    """G: target image -> source style. ``forward(x)`` returns the image; ``translate(x)`` also the maps."""

    def __init__(self, cfg: TranslatorConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.ngf, cfg.n_blocks)
        init_weights(self.encoder)  # before the decoders draw: the same encoder with or without attention
        if cfg.attention:
            self.content = RGBDecoder(cfg.ngf, 3 * cfg.n_content)
            self.attention = AttentionDecoder(cfg.ngf, cfg.n_content)
            init_weights(self.content)
            init_weights(self.attention)
            init_mask_head(self.attention.logits)
        else:
            self.decoder = RGBDecoder(cfg.ngf, 3)
            init_weights(self.decoder)

    def translate(self, x: torch.Tensor) -> TranslatorOutput:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % 4 or x.shape[3] % 4:
            raise VspaError(
                f"translator input: expected a [B, 3, H, W] batch with H and W multiples of 4, got "
                f"{tuple(x.shape)}. Pad or crop the images (vspa.translation.apply pads automatically)."
            )
        h = self.encoder(x)
        if not self.cfg.attention:
            return TranslatorOutput(self.decoder(h), None, None)
        b, _, height, width = x.shape
        content = self.content(h).view(b, self.cfg.n_content, 3, height, width)
        masks = self.attention(h)
        return TranslatorOutput(compose(content, masks, x), content, masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.translate(x).image


MASK_GAIN = 2.0  # Xavier gain of G_A's mask head (1x1 conv to n + 1 logits)
BACKGROUND_BIAS = -2.0  # initial bias of the background logit (the foreground ones start at 0)


def init_mask_head(conv: nn.Conv2d, gain: float = MASK_GAIN, background_bias: float = BACKGROUND_BIAS) -> None:
    """Distinct mask logits at initialisation: Xavier-normal weights with gain ``gain``, each output's weights
    centred over the input channels (E's features are ReLU outputs with similar means, so an uncentred row
    would give one mask a larger share everywhere), foreground biases 0, background bias ``background_bias``."""
    with torch.no_grad():
        nn.init.xavier_normal_(conv.weight, gain=gain)
        conv.weight.sub_(conv.weight.mean(dim=1, keepdim=True))
        conv.bias.zero_()
        conv.bias[-1] = background_bias


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """CUT's default initialisation: Xavier-normal with gain 0.02 for convs and linears, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
