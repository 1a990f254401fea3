"""Mixed precision for a training loop: autocast plus gradient scaling, off by default.

``Precision(enabled, device)``: with ``enabled`` the forward passes run under ``torch.autocast`` (float16 on
CUDA; bfloat16 on the CPU, which is ~1.3x faster per iteration on a CPU with bfloat16 instructions such as
AVX512-BF16 or AMX; not measured on a CPU without them, where it is emulated: README "Speed") and
the loss is scaled before the backward pass (``torch.amp.GradScaler``), unscaled before the optimiser step,
and a step whose gradients are not finite is skipped, as AMP does. Disabled, every method is the plain fp32
operation (``backward`` is ``loss.backward()``, ``step`` is ``optimizer.step()``), so runs without mixed
precision are bit-identical to runs made before this existed.
"""

from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, enabled: bool, device: torch.device | str):
        device = torch.device(device)
        self.enabled = bool(enabled)
        self.device_type = device.type
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled) if self.enabled else None

    def autocast(self):
        """Context of the forward pass (a no-op when disabled)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate (scaled when enabled; ratios of gradients of scaled terms are unchanged)."""
        return self.scaler.scale(loss) if self.enabled else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale, step (skipped when a gradient is not finite) and update the scale; plain step when disabled."""
        if not self.enabled:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
