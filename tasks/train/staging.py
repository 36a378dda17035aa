"""The network seen as `frozen prefix -> trainable suffix` for one stage, and the exact feature cache.

Layers a stage keeps frozen run in eval mode, so their output for a given (image, augmentation
variant) never changes. With a finite augmentation set (the dihedral variants) the trainer computes
that output once per pair and trains the suffix on the cached tensors: the same computation as the
uncached loop up to float rounding, only faster.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks import backbones
from tasks.device import Precision
from tasks.train.augment import prepare
from tasks.train.rowfile import scratch_rows


class StagedModel:
    """The network seen as `prefix -> suffix` for one stage: prefix frozen (eval), suffix trains."""

    def __init__(self, model: nn.Module, trainable, bn_policy: str):
        self.model = model
        parts = backbones.sequential_parts(model)
        head = model.get_classifier()
        for p in model.parameters():
            p.requires_grad_(False)
        if trainable == "head":
            self.n_frozen = None  # whole backbone frozen: the prefix ends at the pooled features
            trainable_modules = [head]
        elif trainable == "all":
            self.n_frozen = 0
            trainable_modules = [model]
        else:
            n_blocks = int(trainable)
            if parts is not None:
                # the stem and the last part (head conv) go with their neighbours
                self.n_frozen = max(0, len(parts) - 1 - n_blocks)
                trainable_modules = [*parts[self.n_frozen:], head]
            else:
                self.n_frozen = 0
                names = [n for group in backbones.backbone_blocks(model)[-n_blocks:] for n in group]
                named = dict(model.named_parameters())
                for n in names:
                    named[n].requires_grad_(True)
                trainable_modules = [head]
        for m in trainable_modules:
            for p in m.parameters():
                p.requires_grad_(True)
        if bn_policy == "frozen":  # statistics and affine parameters fixed (FrozenBatchNorm-style)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        self.parts = parts
        self.bn_policy = bn_policy

    def train_mode(self) -> None:
        """Trainable modules in train mode; frozen ones (and all BN under `eval`/`frozen`) in eval mode."""
        self.model.train()
        for m in self.model.modules():
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
            if self.bn_policy in ("eval", "frozen") and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    @property
    def cacheable(self) -> bool:
        return self.n_frozen is None or (self.parts is not None and self.n_frozen > 0)

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part (run in eval mode, no grad)."""
        if self.n_frozen is None:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        for part in self.parts[: self.n_frozen]:
            x = part(x)
        return x

    def suffix(self, f: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.n_frozen is None:
            if m.drop_rate > 0:
                f = F.dropout(f, p=m.drop_rate, training=m.training)
            return m.get_classifier()(f)
        for part in self.parts[self.n_frozen:]:
            f = part(f)
        return m.forward_head(f)


class TrainableForward(nn.Module):
    """What one training step runs: the suffix on cached features, or the whole model.

    A module of its own so DDP and `torch.compile` can wrap exactly the trainable computation.
    """

    def __init__(self, staged: StagedModel, on_features: bool):
        super().__init__()
        self.model = staged.model
        self._staged, self._on_features = staged, on_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._staged.suffix(x) if self._on_features else self.model(x)


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block; afterwards every module gets back its own mode (a plain
    `model.train()` would undo the per-module modes a stage set up)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


class FeatureCache:
    """Prefix outputs per (variant, image), computed once, before the epoch that first needs them.

    Entries are always computed in chunks of exactly `batch_size` images (the last chunk padded
    with repeats): CPU kernels round differently for different batch sizes, but not for different
    images at the same batch size. So an entry's value does not depend on when or next to which
    images it was computed, and a resumed run (whose cache starts empty) reproduces an
    uninterrupted one bit for bit (`prefix`, when given, must keep that: ONNX Runtime on a graph of exactly that
    batch size does). With `spill` (a folder), entries live in scratch files there instead of
    in memory (`SpilledFeatures`): the same values, read back exactly.
    """

    def __init__(self, staged: StagedModel, images, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, batch_size: int, precision: Precision = Precision(), spill: Path | None = None,
                 prefix: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.staged, self.images, self.mean, self.std = staged, images, mean, std
        self.prefix = prefix  # computes staged.prefix another way (ONNX Runtime, `tasks.train.prefix_onnx`)
        self.device, self.precision, self.chunk, self.spill = device, precision, batch_size, spill
        self.store: dict[int, torch.Tensor] = {}
        self.done: dict[int, torch.Tensor] = {}

    def fill(self, variant: int, idx: torch.Tensor, desc: str | None = None) -> None:
        """Compute the entries of `idx` for `variant` that are not cached yet."""
        done = self.done.setdefault(variant, torch.zeros(len(self.images), dtype=torch.bool))
        missing = idx[~done[idx]].unique()
        starts = range(0, len(missing), self.chunk)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=True if desc is None else None):
            chunk = missing[start : start + self.chunk]
            padded = torch.cat([chunk, chunk[:1].expand(self.chunk - len(chunk))])
            x = prepare(self.images[padded], variant, self.mean, self.std, self.device)
            if self.prefix is not None:
                f = self.prefix(x)[: len(chunk)]
            else:
                with eval_mode(self.staged.model), torch.no_grad(), self.precision.autocast(self.device):
                    f = self.staged.prefix(x)[: len(chunk)].float().cpu()
            if variant not in self.store and self.spill is not None:
                self.store[variant] = SpilledFeatures(self.spill, len(self.images), tuple(f.shape[1:]))
            elif variant not in self.store:  # same memory format as the live path, so the same kernels run
                fmt = torch.channels_last if f.ndim == 4 else torch.contiguous_format
                self.store[variant] = torch.empty((len(self.images), *f.shape[1:]), dtype=f.dtype).to(memory_format=fmt)
            self.store[variant][chunk] = f
            done[chunk] = True

    def get(self, variant: int, idx: torch.Tensor) -> torch.Tensor:
        self.fill(variant, idx)
        return self.store[variant][idx]

    def read(self, variant: int, idx: torch.Tensor) -> torch.Tensor:
        """Entries filled before: a read only, safe beside a training step (the prefetch thread's path)."""
        if variant not in self.done or not bool(self.done[variant][idx].all()):
            raise RuntimeError(f"feature cache: variant {variant} entries read before they were filled")
        return self.store[variant][idx]


class SpilledFeatures:
    """One variant's cache entries in a nameless scratch file (`tasks.train.rowfile`), indexed like the in-memory
    tensor: 4-d features are stored per image in channels-last order and come back as the same channels-last
    tensor, so the trainable layers run the same kernels on the same values."""

    def __init__(self, folder: Path, n: int, shape: tuple[int, ...]):
        self.nchw = len(shape) == 3
        row = (shape[1], shape[2], shape[0]) if self.nchw else shape
        self.rows = scratch_rows(folder, "features", n, row, np.float32)

    def __setitem__(self, idx: torch.Tensor, f: torch.Tensor) -> None:
        self.rows.write(idx.numpy(), (f.permute(0, 2, 3, 1) if self.nchw else f).contiguous().numpy())

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(self.rows.read(idx.numpy()))
        return t.permute(0, 3, 1, 2) if self.nchw else t


@torch.no_grad()
def predict_logits(staged: StagedModel, images, mean: Sequence[float], std: Sequence[float],
                   device: torch.device, batch_size: int, cache: FeatureCache | None = None,
                   precision: Precision = Precision()) -> torch.Tensor:
    """Validation logits for uint8 images (a tensor or an ImageStore; identity variant), in eval mode; through
    `cache` when given."""
    model = staged.model
    out = []
    with eval_mode(model), precision.autocast(torch.device(device)):
        for start in range(0, len(images), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(images)))
            if cache is not None:
                out.append(staged.suffix(cache.get(0, idx).to(device)).float().cpu())
            else:
                out.append(model(prepare(images[idx], 0, mean, std, device)).float().cpu())
    return torch.cat(out)
