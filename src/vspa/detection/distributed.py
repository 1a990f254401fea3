"""Multi-process training under ``torchrun`` (one process per device).

``torchrun --nproc_per_node=N stages/train.py`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
``setup`` then joins the process group (gloo on CPU, nccl on GPU). Without those variables everything
here is a no-op for a single process, so the same code runs both ways.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vspa.utils import VspaError, get_device


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes checkpoints, logs and outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise VspaError(f"environment variable {name}={value!r} is not an integer. Launch with torchrun.") from None


def env_world_size() -> int:
    """Number of processes torchrun started (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device_name: str = "auto") -> DistContext:
    """The process's rank, world size and device; joins the process group when ``WORLD_SIZE > 1``.

    Idempotent: a second call returns the same context without initialising again.
    """
    world_size = env_world_size()
    if world_size <= 1:
        return DistContext(0, 1, 0, get_device(device_name))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = get_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise VspaError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): start torchrun with "
                f"--nproc_per_node at most the number of GPUs."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a copy; the input is unchanged)."""
    out = tensor.detach().clone()
    if ctx.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= ctx.world_size
    return out


def cleanup(ctx: DistContext) -> None:
    """Wait for every process, then leave the process group (call once, at the end of a stage)."""
    if ctx.enabled and dist.is_initialized():
        barrier(ctx)
        dist.destroy_process_group()
