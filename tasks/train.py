"""Train stage: staged fine-tuning (frozen backbone first, then unfrozen), CPU or GPU, resumable.

Each stage in `train.stages` says what trains (`head`, `all`, or the last N backbone blocks),
for how many epochs, with which optimizer, learning rates and schedule, and what BatchNorm
does. At a stage boundary the parameter groups and the schedule are rebuilt for the new set
of trainable parameters; optimizer state (e.g. AdamW moments) carries over for parameters
that keep training.

Feature caching: layers that a stage keeps frozen run in eval mode, so their output for a
given (image, augmentation variant) never changes. When augmentation is the finite set of
flips/90-degree rotations, the trainer computes that output once per pair, on first use, and
trains the rest of the network on the cached tensors: the same computation as the uncached
loop up to float rounding (switch: `train.cache_features`), only faster.

Resume: after every epoch the full training state (weights, optimizer, scheduler, grad
scaler, RNG states, stage index, epoch, best so far) is written atomically to a state file.
A run started again with the same data, weights and params continues from there and ends
with the same weights as an uninterrupted run (CPU, deterministic mode). The state file is
removed once the stage has written its checkpoint.

Distributed: under `torchrun` (WORLD_SIZE > 1) each process trains on its share of every
batch and DDP averages the gradients (gloo on CPU, NCCL on CUDA); every rank runs the same
validation so decisions agree, and only rank 0 writes files.

Checkpoint selection uses the validation split only; the test split is never loaded here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks import models
from tasks.data import (DIHEDRAL, apply_variant, class_weights, normalise, random_crop_resize, random_jitter,
                        resize_batch, split_arrays, standardise, variants_for)
from tasks.ingest import read_manifest
from tasks.io import atomic_path, read_json, sha256_file, write_json
from tasks.metrics import classification_metrics
from tasks.params import StageParams, TrainParams

log = logging.getLogger(__name__)
STATE_VERSION = 1


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


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def effective_image_size(params: TrainParams, device: torch.device) -> int:
    """Full `image_size` on accelerators; on CPU capped at `cpu_image_size` to fit the time budget."""
    if device.type == "cpu" and params.cpu_image_size:
        return min(params.image_size, params.cpu_image_size)
    return params.image_size


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


class StagedModel:
    """The network seen as `prefix -> suffix` for one stage: prefix frozen (eval), suffix trains."""

    def __init__(self, model: nn.Module, trainable, bn_policy: str):
        self.model = model
        parts = models.sequential_parts(model)
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
                names = [n for group in models.backbone_blocks(model)[-n_blocks:] for n in group]
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
    uninterrupted one bit for bit.
    """

    def __init__(self, staged: StagedModel, images: torch.Tensor, mean, std, device, batch_size: int,
                 precision: Precision = Precision()):
        self.staged, self.images, self.mean, self.std = staged, images, mean, std
        self.device, self.precision, self.chunk = device, precision, batch_size
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
            with eval_mode(self.staged.model), torch.no_grad(), self.precision.autocast(self.device):
                f = self.staged.prefix(x)[: len(chunk)].float().cpu()
            if variant not in self.store:  # same memory format as the live path, so the same kernels run
                fmt = torch.channels_last if f.ndim == 4 else torch.contiguous_format
                self.store[variant] = torch.empty((len(self.images), *f.shape[1:]), dtype=f.dtype).to(memory_format=fmt)
                if self.device.type == "cuda":
                    self.store[variant] = self.store[variant].pin_memory()
            self.store[variant][chunk] = f
            done[chunk] = True

    def get(self, variant: int, idx: torch.Tensor) -> torch.Tensor:
        self.fill(variant, idx)
        return self.store[variant][idx]


def prepare(x_uint8: torch.Tensor, variant: int, mean, std, device: torch.device,
            augment: set[str] = frozenset(), crop_scale: float = 1.0, jitter: float = 0.0,
            gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images -> the normalised float batch the network sees (dihedral variant, and random
    crop / brightness-contrast jitter when asked: those need `gen`)."""
    x = apply_variant(x_uint8, variant).to(device, non_blocking=True)
    if augment & {"crop", "jitter"}:
        x = x.float().div_(255.0)
        if "crop" in augment:
            x = random_crop_resize(x, crop_scale, gen)
        if "jitter" in augment:
            x = random_jitter(x, jitter, gen)
        x = standardise(x, mean, std)
    else:
        x = normalise(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last)


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


@torch.no_grad()
def predict_logits(staged_or_model, images: torch.Tensor, mean, std, device, batch_size: int,
                   cache: FeatureCache | None = None, precision: Precision = Precision()) -> torch.Tensor:
    """Logits for uint8 images (identity variant), in eval mode."""
    model = staged_or_model.model if isinstance(staged_or_model, StagedModel) else staged_or_model
    out = []
    with eval_mode(model), precision.autocast(torch.device(device)):
        for start in range(0, len(images), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(images)))
            if cache is not None:
                out.append(staged_or_model.suffix(cache.get(0, idx).to(device)).float().cpu())
            else:
                out.append(model(prepare(images[idx], 0, mean, std, device)).float().cpu())
    return torch.cat(out)


def select_score(metrics: dict, loss: float, name: str) -> float:
    return -loss if name == "loss" else metrics[name]


# ---- resumable state ------------------------------------------------------------------------


def rng_state(gen: torch.Generator, aug_gen: torch.Generator) -> dict:
    state = {"gen": gen.get_state(), "aug_gen": aug_gen.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(gen: torch.Generator, aug_gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["gen"])
    aug_gen.set_state(state["aug_gen"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path | None, fingerprint: str) -> dict | None:
    """The saved training state if it belongs to this exact run (data, weights, params), else None."""
    if path is None or not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a state file we cannot read is not worth failing the run for
        log.warning("train: ignoring unreadable state file %s (%s); starting over", path, exc)
        return None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        log.info("train: %s is from a different run (data, weights or params changed); starting over", path)
        return None
    return state


# ---- the training loop ----------------------------------------------------------------------


def fit(model: nn.Module, classes: list[str], train_x: torch.Tensor, train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, params: TrainParams, mean, std, seed: int,
        device: torch.device, on_epoch=None, state_path: Path | None = None, fingerprint: str = "",
        resume: bool = True, dist: Dist = Dist()) -> tuple[nn.Module, dict, list[dict]]:
    """Run every stage; return the model with the best validation weights, the best record, history.

    With `state_path`, the training state is saved there after every epoch and, with `resume`
    and a saved state matching `fingerprint`, a previous run is continued from it.
    """
    gen = seed_everything(seed)  # batch order and variants: the same on every rank
    if dist.world > 1:
        torch.manual_seed(seed + 7919 * dist.rank)  # dropout masks: independent per rank
    aug_gen = torch.Generator().manual_seed(seed + 1000 * (dist.rank + 1))  # crop/jitter: per rank
    model.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        train_x, val_x = train_x.pin_memory(), val_x.pin_memory()
    precision = pick_precision(params.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scale_grads)
    n_classes = len(classes)
    weight = class_weights(train_y, n_classes).to(device) if params.imbalance == "weighted_loss" else None
    sample_weight = class_weights(train_y, n_classes)[train_y] if params.imbalance == "sampler" else None
    variants = torch.tensor(variants_for(params.augment))
    extra_aug = set(params.augment) - DIHEDRAL
    best: dict = {"score": -math.inf}
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict] = []
    resume = load_state(state_path, fingerprint) if resume else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        best, best_state, history = resume["best"], resume["best_state"], resume["history"]
        scaler.load_state_dict(resume["scaler"])
        log.info("train: resuming from %s after stage %d epoch %d", state_path, resume["stage_index"], resume["epoch"])
    full_train_x, full_val_x = train_x, val_x
    # progressive resizing: epochs of stages at image_scale < 1 are cheaper; only full-size epochs
    # may be selected as best (the checkpoint is evaluated and exported at full size)
    any_full = any(s.image_scale == 1.0 and s.epochs > 0 for s in params.stages)
    previous_optimizer = None
    for stage_index, stage in enumerate(params.stages):
        if stage.epochs == 0 or (resume is not None and stage_index < resume["stage_index"]):
            continue
        full = full_train_x.shape[-1]
        size = full if stage.image_scale == 1.0 else max(32, int(round(full * stage.image_scale / 8)) * 8)
        train_x, val_x = resize_batch(full_train_x, size), resize_batch(full_val_x, size)
        selectable = stage.image_scale == 1.0 or not any_full
        staged = StagedModel(model, stage.trainable, stage.bn)
        use_cache = params.cache_features and staged.cacheable and not extra_aug
        train_cache = FeatureCache(staged, train_x, mean, std, device, params.batch_size, precision) if use_cache else None
        val_cache = FeatureCache(staged, val_x, mean, std, device, params.batch_size, precision) if use_cache else None
        groups = param_groups(model, stage)
        if not groups:
            raise TrainingError(f"stage '{stage.name}' has nothing to train (trainable={stage.trainable}, bn={stage.bn})")
        n_trainable = sum(p.numel() for g in groups for p in g["params"])
        optimizer = make_optimizer(groups, stage, previous_optimizer)
        steps_per_epoch = math.ceil(len(train_x) / params.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
            stage.epochs * steps_per_epoch, int(stage.warmup_epochs * steps_per_epoch), stage.schedule))
        step_fn: nn.Module = TrainableForward(staged, use_cache)
        if dist.world > 1:
            step_fn = nn.parallel.DistributedDataParallel(
                step_fn, device_ids=[device.index] if device.type == "cuda" else None)
        if params.compile:
            step_fn = torch.compile(step_fn)
        # each image cycles through the augmentation variants from a random start, so every
        # variant is seen (and cached) once per len(variants) epochs instead of at random
        offsets = torch.randint(len(variants), (len(train_x),), generator=gen)
        start_epoch, stage_best, bad_epochs = 0, -math.inf, 0
        if resume is not None and stage_index == resume["stage_index"]:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            offsets = resume["offsets"]
            start_epoch = stage.epochs if resume["stage_done"] else resume["epoch"]
            stage_best, bad_epochs = resume["stage_best"], resume["bad_epochs"]
            set_rng_state(gen, aug_gen, resume["rng"][dist.rank])
            resume = None
        if start_epoch < stage.epochs:
            log.info("stage %d '%s': epochs %d-%d at %d px, trainable=%s (%d params, %s, lr %g, backbone x%g), "
                     "bn=%s, cached prefix=%s", stage_index, stage.name, start_epoch + 1, stage.epochs, size,
                     stage.trainable, n_trainable, stage.optimizer, stage.lr, stage.backbone_lr_mult, stage.bn, use_cache)
        for epoch in range(start_epoch, stage.epochs):
            t0 = time.time()
            staged.train_mode()
            order = epoch_order(len(train_x), sample_weight, gen)
            choice = variants[(offsets + epoch) % len(variants)]
            # this rank's share of each batch; a last batch too small to give every rank an image is skipped
            batches = [b[dist.rank :: dist.world] for b in order.split(params.batch_size) if len(b) >= dist.world]
            if use_cache:
                mine = torch.cat(batches)
                for v in variants.tolist():
                    train_cache.fill(v, mine[choice[mine] == v],
                                     desc=f"cache features (variant {v})" if dist.main else None)
            total_loss, seen = 0.0, 0
            bar = tqdm(batches, desc=f"{stage.name} {epoch + 1}/{stage.epochs}", unit="batch", leave=False,
                       disable=None if dist.main else True)
            for idx in bar:
                var = choice[idx]
                inputs, targets = [], []
                for v in var.unique().tolist():
                    sub = idx[var == v]
                    inputs.append(train_cache.get(v, sub).to(device, non_blocking=True) if use_cache
                                  else prepare(train_x[sub], v, mean, std, device, extra_aug, params.crop_scale,
                                               params.jitter, aug_gen))
                    targets.append(train_y[sub])
                x, y = torch.cat(inputs), torch.cat(targets).to(device, non_blocking=True)
                with precision.autocast(device):
                    logits = step_fn(x)
                loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=params.label_smoothing)
                check_finite(loss, dist, stage, stage_index, epoch, state_path)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if params.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], params.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            if dist.world > 1:  # the epoch's loss over every rank's images
                sums = torch.tensor([total_loss, float(seen)], dtype=torch.float64, device=device)
                torch_dist.all_reduce(sums)
                total_loss, seen = sums[0].item(), int(sums[1].item())
            val_logits = predict_logits(staged if use_cache else model, val_x, mean, std, device,
                                        params.batch_size * 2, val_cache, precision)
            val_loss = F.cross_entropy(val_logits, val_y).item()
            val_metrics = classification_metrics(val_y.numpy(), val_logits.argmax(1).numpy(), classes)
            seconds = time.time() - t0
            record = {
                "stage": stage.name, "stage_index": stage_index, "epoch": epoch + 1, "global_epoch": len(history) + 1,
                "train_loss": total_loss / max(seen, 1), "val_loss": val_loss,
                "val_accuracy": val_metrics["accuracy"], "val_macro_recall": val_metrics["macro_recall"],
                "val_macro_f1": val_metrics["macro_f1"], "lr": optimizer.param_groups[-1]["lr"],
                "image_size": size, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9),
            }
            if dist.world > 1:
                record["replica_max_diff"] = replica_difference(groups, dist)
            history.append(record)
            score = select_score(val_metrics, val_loss, params.select_metric)
            improved = selectable and score > best["score"]
            if improved:
                best = {"score": score, "stage": stage.name, "epoch": epoch + 1, "global_epoch": len(history),
                        "metric": params.select_metric, "val": val_metrics}
                best_state = copy.deepcopy(model.state_dict())
            if score > stage_best:
                stage_best, bad_epochs = score, 0
            else:
                bad_epochs += 1
            stop = 0 < params.early_stopping_patience <= bad_epochs and epoch + 1 < stage.epochs
            if dist.main:
                log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f val_f1 %.4f (%.0fs, %.1f img/s)%s",
                         stage.name, epoch + 1, stage.epochs, record["train_loss"], val_loss,
                         val_metrics["accuracy"], val_metrics["macro_f1"], seconds, record["images_per_s"],
                         " *" if improved else "")
            if stop and dist.main:
                log.info("%s: no better validation %s for %d epochs: stage stops early", stage.name,
                         params.select_metric, bad_epochs)
            rngs = gather_objects(rng_state(gen, aug_gen), dist) if state_path is not None else None
            if state_path is not None and dist.main:
                save_state(state_path, {
                    "version": STATE_VERSION, "fingerprint": fingerprint, "stage_index": stage_index,
                    "epoch": epoch + 1, "stage_done": stop or epoch + 1 == stage.epochs, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "offsets": offsets, "rng": rngs, "best": best,
                    "best_state": best_state, "history": history, "stage_best": stage_best, "bad_epochs": bad_epochs,
                })
            if on_epoch is not None and dist.main:
                on_epoch(history)
            if stop:
                break
        previous_optimizer = optimizer
    model.load_state_dict(best_state)
    return model, best, history


def epoch_order(n: int, sample_weight: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """A shuffled pass over the training set, or with `sample_weight` a class-balanced draw with replacement."""
    if sample_weight is not None:
        return torch.multinomial(sample_weight, n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


def check_finite(loss: torch.Tensor, dist: Dist, stage: StageParams, stage_index: int, epoch: int,
                 state_path: Path | None) -> None:
    """Stop on a NaN/inf loss (on every rank at once), naming the fix; the last saved state stays."""
    value = loss.detach()
    if dist.world > 1:
        value = value.clone()
        torch_dist.all_reduce(value)
    if not torch.isfinite(value):
        kept = f"; the last good state is kept in {state_path}" if state_path is not None and Path(state_path).exists() else ""
        raise TrainingError(
            f"non-finite loss ({value.item()}) in stage '{stage.name}' epoch {epoch + 1}; "
            f"lower train.stages[{stage_index}].lr (now {stage.lr}){kept}"
        )


def replica_difference(groups: list[dict], dist: Dist) -> float:
    """Largest difference between ranks of a per-tensor checksum of the trainable weights (0 = identical)."""
    sums = torch.stack([p.detach().double().sum() for g in groups for p in g["params"]]).cpu()
    gathered = gather_objects(sums, dist)
    return max(float((other - gathered[0]).abs().max()) for other in gathered)


def gather_objects(obj, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch_dist.all_gather_object(out, obj)
    return out


def save_state(path: Path, state: dict) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def run_fingerprint(manifest_path: Path, base_dir: Path, params: TrainParams, seed: int, world: int) -> str:
    """Identifies a training run: a saved state is resumed only by a run with the same fingerprint."""
    parts = {"manifest": sha256_file(manifest_path), "weights": sha256_file(base_dir / "weights.pt"),
             "params": params.model_dump(mode="json"), "seed": seed, "world": world}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(manifest_path: Path, images_dir: Path, base_dir: Path, params: TrainParams, seed: int,
        checkpoint_path: Path, metrics_path: Path, history_path: Path, workers: int = 4,
        state_path: Path | None = None, resume: bool = True) -> dict:
    """The train stage: read data and pretrained weights, fine-tune, write the best checkpoint.

    With `state_path`, progress is saved there after every epoch; a rerun with `resume` continues
    from it when data, weights and params are unchanged (e.g. after the process was killed).
    """
    dist = init_distributed()
    try:
        return _run(manifest_path, images_dir, base_dir, params, seed, checkpoint_path, metrics_path, history_path,
                    workers, state_path, resume, dist)
    finally:
        if dist.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _run(manifest_path, images_dir, base_dir, params: TrainParams, seed, checkpoint_path, metrics_path, history_path,
         workers, state_path, resume, dist: Dist) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    device = pick_device(dist.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    manifest = read_manifest(manifest_path)
    classes = sorted(manifest["label"].astype(str).unique())
    for split in ("train", "val"):
        if not (manifest["split"] == split).any():
            raise TrainingError(f"{manifest_path}: no '{split}' images; check data.split fractions")
    base_meta = read_json(base_dir / "meta.json")
    size = effective_image_size(params, device)
    model = models.build(base_meta)
    model.load_state_dict(torch.load(base_dir / "weights.pt", map_location="cpu", weights_only=True))
    models.with_new_head(model, len(classes), seed)
    mean, std = base_meta["mean"], base_meta["std"]
    fingerprint = run_fingerprint(manifest_path, base_dir, params, seed, dist.world)
    t0 = time.time()
    train_x, train_y = split_arrays(manifest, images_dir, "train", classes, size, workers)
    val_x, val_y = split_arrays(manifest, images_dir, "val", classes, size, workers)
    if dist.main:
        log.info("train: %d train / %d val images at %d px on %s (%d threads%s), classes %s", len(train_x),
                 len(val_x), size, device, torch.get_num_threads(),
                 f", {dist.world} processes" if dist.world > 1 else "", classes)
    model, best, history = fit(model, classes, train_x, train_y, val_x, val_y, params, mean, std, seed, device,
                               on_epoch=lambda h: write_history(history_path, h), state_path=state_path,
                               fingerprint=fingerprint, resume=resume, dist=dist)
    wall = time.time() - t0
    summary = {"best": best, "wall_time_s": round(wall, 1), "image_size": size, "device": str(device),
               "processes": dist.world, "n_train": len(train_x), "n_val": len(val_x), "epochs": len(history)}
    if dist.main:
        preprocessing = models.Preprocessing(size=size, mean=tuple(mean), std=tuple(std)).to_dict()
        save_checkpoint(checkpoint_path, model, classes, base_meta, preprocessing,
                        {"train": params.model_dump(mode="json"), "seed": seed},
                        {k: v for k, v in best.items() if k != "val"})
        write_history(history_path, history)  # also when a resumed run had nothing left to train
        write_json(metrics_path, summary)
        if state_path is not None:
            Path(state_path).unlink(missing_ok=True)  # the checkpoint is written: nothing left to resume
        log.info("train: best %s=%.4f at stage '%s' epoch %d; %.0fs; checkpoint %s", best["metric"], best["score"],
                 best["stage"], best["epoch"], wall, checkpoint_path)
    return summary


def write_history(path: Path, history: list[dict]) -> None:
    """Per-epoch metrics as a CSV that `dvc plots show` draws (x: global_epoch); rewritten each epoch."""
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def save_checkpoint(path: Path, model: nn.Module, classes: list[str], base_meta: dict, preprocessing: dict,
                    config: dict, best: dict) -> None:
    """Weights plus everything needed to rebuild and use them (architecture, classes, preprocessing)."""
    checkpoint = {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "classes": classes,
        "base": base_meta,
        "preprocessing": preprocessing,
        "config": config,
        "best": best,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Model (eval mode) and checkpoint dict; the architecture comes from the checkpoint itself."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = models.build(ckpt["base"], num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
