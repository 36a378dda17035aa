"""Optimizer and learning-rate schedule of one stage: discriminative lrs, no decay on norms and biases,
state carried over from the previous stage for parameters that keep training."""

from __future__ import annotations

import math

import torch
from torch import nn

from tasks.params import StageParams


def param_groups(model: nn.Module, stage: StageParams) -> list[dict]:
    """Head at `lr`, backbone at `lr * backbone_lr_mult`; no weight decay on norms and biases."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in head_ids, p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, no_decay), ps in sorted(groups.items()):
        out.append({
            "params": ps,
            "name": f"{'head' if is_head else 'backbone'}{'/no_decay' if no_decay else ''}",
            "lr": stage.lr if is_head else stage.lr * stage.backbone_lr_mult,
            "weight_decay": 0.0 if no_decay else stage.weight_decay,
        })
    return out


def make_optimizer(groups: list[dict], stage: StageParams, previous: torch.optim.Optimizer | None):
    """AdamW or SGD (Nesterov momentum) over `groups`; state of parameters that trained in the
    previous stage under the same optimizer type is carried over (no restart of the moments)."""
    if stage.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=stage.momentum, nesterov=stage.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups)
    if previous is not None and type(previous) is type(optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in previous.state:
                    optimizer.state[p] = previous.state[p]
    return optimizer


def lr_lambda(total_steps: int, warmup_steps: int, kind: str = "cosine"):
    """Multiplier of each group's base lr at a step.

    cosine: linear warmup, then cosine decay to 0. onecycle: from lr/25 up to lr over the warmup
    (30% of the stage when no warmup is given), then cosine down to lr/1e4. constant: warmup, then 1.
    """
    if kind == "onecycle" and warmup_steps == 0:
        warmup_steps = max(1, int(0.3 * total_steps))

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            if kind == "onecycle":
                return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / warmup_steps))
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        floor = 1e-4 if kind == "onecycle" else 0.0
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageParams, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        stage.epochs * steps_per_epoch, int(stage.warmup_epochs * steps_per_epoch), stage.schedule))
