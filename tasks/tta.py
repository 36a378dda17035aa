"""Test-time augmentation (TTA): the model applied to exact variants of each image, predictions averaged.

An EL image of a solar cell means the same rotated by 90 degrees or mirrored, so the mean of the
model's probabilities over the 8 dihedral variants is a better estimate than any one of them
(measured on ELPV: docs/benchmarks.md). `export.tta` wraps the trained model in `Averaged`
after normalisation, both where the evaluate stage scores it and inside the exported ONNX graph,
so the gate, `finetune predict` and the model server all see the same model. Training and
checkpoint selection never use it. The cost is one forward pass per variant.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.tensors import apply_variant

VARIANTS = {"none": (0,), "hflip": (0, 4), "dihedral": tuple(range(8))}


class Averaged(nn.Module):
    """Outputs log(mean over the variants of softmax(model(variant))): logits whose softmax is the averaged
    probabilities (computed as a log-sum-exp, so no class underflows to -inf)."""

    def __init__(self, model: nn.Module, variants: tuple[int, ...]):
        super().__init__()
        self.model, self.variants = model, tuple(variants)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # one graph over one batch of all the views: ONNX Runtime runs it well
            views = torch.cat([apply_variant(x, v) for v in self.variants])
            log_p = self.model(views).log_softmax(-1).reshape(len(self.variants), x.shape[0], -1)
        else:  # PyTorch on CPU: one batch per view is 1.8x faster than one 8x batch (measured, 2 cores, 224 px)
            log_p = torch.stack([self.model(apply_variant(x, v)).log_softmax(-1) for v in self.variants])
        return torch.logsumexp(log_p, 0) - math.log(len(self.variants))


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    """`model` itself for `none`, else wrapped (eval mode)."""
    if mode not in VARIANTS:
        raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of {sorted(VARIANTS)}")
    return model if mode == "none" else Averaged(model, VARIANTS[mode]).eval()
