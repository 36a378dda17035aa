"""Weight averaging: an exponential moving average (EMA) of the weights over training steps.

With `train.ema_decay` > 0 the averaged weights are what validation scores, what checkpoint selection
keeps and so what is evaluated and exported: averaging the last few hundred steps smooths the noise of
small-batch updates. The decay warms up as in timm's `ModelEmaV3`, min(decay, (1 + t) / (10 + t)),
so the first steps do not pin the average to the freshly initialised head. Frozen weights average to
themselves exactly (lerp of equal values), so cached frozen-layer features stay valid.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, shadow: dict | None = None, step: int = 0) -> None:
        self.decay, self.step = decay, step
        self.shadow = shadow if shadow is not None else copy.deepcopy(model.state_dict())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's weights after one optimizer step into the average."""
        self.step += 1
        decay = self.current_decay()
        for key, value in model.state_dict().items():
            avg = self.shadow[key]
            if value.dtype.is_floating_point:
                avg.lerp_(value.to(avg.device), 1.0 - decay)
            else:  # step counters and the like: the latest value
                avg.copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own ones again after it."""
        live = copy.deepcopy(model.state_dict())
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(live)
