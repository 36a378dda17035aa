"""Where and in which precision tensors run: CUDA when present, then Apple MPS, else CPU."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """Mixed precision for this device: autocast dtype (None = fp32) and whether grads need scaling."""

    dtype: torch.dtype | None = None
    scale_grads: bool = False

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def pick_precision(amp: str, device: torch.device) -> Precision:
    """`auto`: bf16 on CUDA GPUs that support it, else fp16 with grad scaling; fp32 on CPU and MPS
    (bf16 autocast measured slower than fp32 on our CPUs)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision()
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return Precision(torch.bfloat16)
    return Precision(torch.float16, scale_grads=device.type == "cuda")
