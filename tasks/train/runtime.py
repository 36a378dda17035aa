"""Where a training process runs: seeds, image size for the device, and its place in a distributed run."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from tasks.device import pick_device
from tasks.params import TrainParams


class TrainingError(RuntimeError):
    """Training cannot go on (bad params, non-finite loss); the message says why."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a distributed run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """From torchrun's environment: join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        # FINETUNE_DIST_BACKEND=gloo lets several processes share one GPU (NCCL refuses that)
        backend = os.environ.get("FINETUNE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(pick_device(local_rank))
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def effective_image_size(params: TrainParams, device: torch.device) -> int:
    """Full `image_size` on accelerators; on CPU capped at `cpu_image_size` to fit the time budget."""
    if device.type == "cpu" and params.cpu_image_size:
        return min(params.image_size, params.cpu_image_size)
    return params.image_size


def gather_objects(obj, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch_dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    if dist.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def replica_difference(params: list[torch.nn.Parameter], dist: Dist) -> float:
    """Largest difference between ranks of a per-tensor checksum of the trainable weights (0 = identical)."""
    sums = torch.stack([p.detach().double().sum() for p in params]).cpu()
    gathered = gather_objects(sums, dist)
    return max(float((other - gathered[0]).abs().max()) for other in gathered)


def loss_is_finite(loss: torch.Tensor, dist: Dist) -> tuple[bool, float]:
    """Whether the loss is finite on every rank (all ranks stop together)."""
    value = loss.detach()
    if dist.world > 1:
        value = value.clone()
        torch_dist.all_reduce(value)
    return bool(torch.isfinite(value)), float(value.item())
