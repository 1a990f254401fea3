"""Backbones for the Faster R-CNN detector: one feature map named ``'0'``.

- ``small``: a from-scratch CNN (conv-GroupNorm-ReLU blocks, output stride 4) that trains in minutes on a CPU.
  GroupNorm rather than BatchNorm: no running statistics, so train and eval mode compute the same
  function, results do not depend on the batch size (or on how a batch is split over processes), and a
  mean teacher's EMA needs no buffer handling.
- ``resnet50`` / ``resnet101``: detectron2's R-C4 layout, the ResNet up to ``layer3`` (stride 16, 1024 ch).
- ``vgg16``: ``conv5_3`` after its ReLU (stride 16, 512 ch).

Every backbone is built with ``weights=None``. ImageNet weights come only from a local file
(``model.pretrained_weights``); nothing is ever downloaded. With pretrained weights the ResNets use frozen
BatchNorm and their stem + ``layer1`` are frozen, and the first two VGG blocks are frozen (as detectron2
does); without them every layer trains and the ResNets use ordinary BatchNorm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50, resnet101, vgg16
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from vspa.utils import VspaError

BACKBONES = ("small", "resnet50", "resnet101", "vgg16")

# Anchor sizes (pixels, in the resized image) used when the model section does not give any.
DEFAULT_ANCHOR_SIZES = {
    "small": (12, 24, 48, 96, 192),
    "resnet50": (32, 64, 128, 256, 512),
    "resnet101": (32, 64, 128, 256, 512),
    "vgg16": (32, 64, 128, 256, 512),
}

HOW_TO_GET_WEIGHTS = (
    'On a machine with network access run, e.g.: python -c "import torch, torchvision; '
    "m = torchvision.models.{arch}(weights='DEFAULT'); torch.save(m.state_dict(), '{path}')\" "
    "and copy the file here, or set model.pretrained_weights: null to train from scratch."
)


class Float32Forward:
    """Mixin for a one-input ``nn.Module``: its forward runs in float32 with autocast off, also under mixed
    precision (``amp: true``). Without autocast the input is already float32 and the module computes exactly
    what its base class does (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class GroupNormFP32(Float32Forward, nn.GroupNorm):
    """``nn.GroupNorm`` in float32 under mixed precision: under bfloat16 autocast on the CPU torch runs GroupNorm
    in bfloat16, whose backward is ~2.5x slower than float32's on the 2-core CPU; normalising in float32 is also
    what mixed-precision recipes recommend."""


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    groups = 8 if cout % 8 == 0 else 1
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        GroupNormFP32(groups, cout),
        nn.ReLU(inplace=True),
    ]


class SmallBackbone(nn.Module):
    """A small two-scale CNN with one output map at stride 4 (``out_channels = 4 * width``).

    A stride-4 branch (conv-GN-ReLU blocks, ``2 * width`` channels) keeps the detail of narrow objects (a
    5 px wide pedestrian still spans a cell); a stride-8 branch (``4 * width`` channels, the last block
    dilated) sees further (receptive field ~90 px). The stride-8 map is upsampled and added to the
    projected stride-4 map, then smoothed by a 3x3 block (a one-step feature pyramid).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.fine = nn.Sequential(*_block(3, w, stride=2), *_block(w, 2 * w, stride=2), *_block(2 * w, 2 * w))
        self.coarse = nn.Sequential(
            *_block(2 * w, 4 * w, stride=2), *_block(4 * w, 4 * w), *_block(4 * w, 4 * w, dilation=2)
        )
        self.lateral = nn.Conv2d(2 * w, 4 * w, 1)
        self.smooth = nn.Sequential(*_block(4 * w, 4 * w))
        self.out_channels = 4 * w
        self.stride = 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # channels-last (NHWC) weights and activations: oneDNN's convolutions (forward and backward) run ~10%
        # faster so on the 2-core CPU at 2 threads (reports/bench/bench_iteration.md); same values up to rounding
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        fine = self.fine(x)
        coarse = self.coarse(fine)
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        return {"0": self.smooth(self.lateral(fine) + up)}


class ResNetC4(nn.Module):
    """ResNet stem + layer1..layer3 (``self.body`` keeps torchvision's parameter names)."""

    def __init__(self, depth: int, pretrained: bool) -> None:
        super().__init__()
        norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
        net = (resnet50 if depth == 50 else resnet101)(weights=None, norm_layer=norm)
        self.body = IntermediateLayerGetter(net, return_layers={"layer3": "0"})
        self.out_channels = 1024
        self.stride = 16
        self.frozen_prefixes = ("conv1.", "bn1.", "layer1.") if pretrained else ()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.body(x))


class VGG16Conv5(nn.Module):
    """VGG16 ``features`` up to conv5_3 + ReLU (``self.body.features`` keeps torchvision's names)."""

    def __init__(self, pretrained: bool) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.features = vgg16(weights=None).features[:30]
        self.out_channels = 512
        self.stride = 16
        # conv1_1 .. conv2_2 are features.0 .. features.7
        self.frozen_prefixes = tuple(f"features.{i}." for i in range(10)) if pretrained else ()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": self.body.features(x)}


def _read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VspaError(
            f"{path}: model.pretrained_weights file not found (ImageNet weights for the {arch} backbone; "
            f"never downloaded). " + HOW_TO_GET_WEIGHTS.format(arch=arch, path=path)
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise VspaError(
            f"{path}: cannot read model.pretrained_weights ({type(exc).__name__}: {exc}). It must be a "
            f"state_dict saved with torch.save. " + HOW_TO_GET_WEIGHTS.format(arch=arch, path=path)
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VspaError(
            f"{path}: model.pretrained_weights is not a state_dict (a mapping of names to tensors). "
            + HOW_TO_GET_WEIGHTS.format(arch=arch, path=path)
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(body: nn.Module, path: str | Path, arch: str) -> None:
    """Load an ImageNet state_dict into ``body`` (non-strict); report what did not match.

    Raises VspaError when the file is missing or unreadable, when no parameter matched, or when a matched
    name has the wrong shape.
    """
    path = Path(path)
    state = _read_state_dict(path, arch)
    own = body.state_dict()
    shape_errors = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise VspaError(
            f"{path}: {len(shape_errors)} tensors have the wrong shape for the {arch} backbone "
            f"(e.g. {shape_errors[0]}). Use weights of torchvision's {arch}. "
            + HOW_TO_GET_WEIGHTS.format(arch=arch, path=path)
        )
    result = body.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    matched = len(own) - len(result.missing_keys)
    if matched == 0:
        raise VspaError(
            f"{path}: none of its {len(state)} tensors matches the {arch} backbone (first key: "
            f"{next(iter(state), '-')}). Use weights of torchvision's {arch}. "
            + HOW_TO_GET_WEIGHTS.format(arch=arch, path=path)
        )
    print(f"[backbone] {path}: loaded {matched} tensors into {arch}", file=sys.stderr)
    if missing:
        print(f"[backbone]   missing (left at init): {len(missing)}, e.g. {missing[:3]}", file=sys.stderr)
    if result.unexpected_keys:
        print(
            f"[backbone]   unused from the file: {len(result.unexpected_keys)}, e.g. {result.unexpected_keys[:3]}",
            file=sys.stderr,
        )


def build_backbone(name: str, pretrained_weights: str | None, small_width: int = 16, load_weights: bool = True):
    """The backbone module (with ``out_channels`` and ``stride``), weights loaded from a file if given.

    ``load_weights=False`` builds the same structure (e.g. frozen BN) without reading the file: used when a
    checkpoint provides all the weights.
    """
    pretrained = pretrained_weights is not None
    if name == "small":
        if pretrained:
            raise VspaError(
                "params.yaml: model.pretrained_weights is set but model.backbone is 'small', which is trained "
                "from scratch. Set model.pretrained_weights: null, or choose resnet50/resnet101/vgg16."
            )
        return SmallBackbone(small_width)
    if name in ("resnet50", "resnet101"):
        backbone = ResNetC4(50 if name == "resnet50" else 101, pretrained)
    elif name == "vgg16":
        backbone = VGG16Conv5(pretrained)
    else:
        raise VspaError(f"params.yaml: unknown model.backbone '{name}'. Choose one of: {', '.join(BACKBONES)}.")
    if pretrained and load_weights:
        load_pretrained(backbone.body, pretrained_weights, name)
    for pname, param in backbone.body.named_parameters():
        if pname.startswith(backbone.frozen_prefixes):
            param.requires_grad_(False)
    return backbone
