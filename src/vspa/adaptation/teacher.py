"""The mean teacher: an exponential moving average (EMA) of the student, used only for labelling.

Adaptive Teacher's update, over every state entry (parameters and buffers)::

    teacher = keep_rate * teacher + (1 - keep_rate) * student

Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied from the student. The teacher never
receives gradients and is switched to eval mode every time it labels (the public MILA code left it in train
mode, so its pseudo-labels depended on batch statistics).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vspa.utils import VspaError


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep_rate: float) -> None:
    """In place: ``teacher <- keep_rate * teacher + (1 - keep_rate) * student`` over parameters and buffers."""
    if not 0.0 <= keep_rate <= 1.0:
        raise VspaError(f"params.yaml: adapt.ema_keep = {keep_rate} is outside [0, 1]. Use e.g. 0.999.")
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    if t_state.keys() != s_state.keys():
        missing = sorted(set(s_state) ^ set(t_state))[:5]
        raise VspaError(f"teacher and student differ in structure (entries {missing}); rebuild the teacher.")
    for name, t_value in t_state.items():
        s_value = s_state[name].detach()
        if t_value.is_floating_point():
            t_value.mul_(keep_rate).add_(s_value.to(t_value.dtype), alpha=1.0 - keep_rate)
        else:
            t_value.copy_(s_value)


@torch.no_grad()
def teacher_detect(teacher, images: list[torch.Tensor]) -> list[dict]:
    """The teacher's detections on ``images`` (in original image coordinates), always in eval mode."""
    teacher.eval()
    return teacher.detect(images)
