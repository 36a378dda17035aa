"""The training loop: stages in order, epochs within a stage, batches within an epoch.

`fit` runs every stage of `train.stages`; each stage rebuilds the trainable set, the optimizer and
the schedule (`run_stage`); each epoch trains on the augmented images or their cached frozen
features (`train_epoch`), validates (`validate`), records one history row, keeps the weights (the last
epoch's, or the best by the validation `select_metric`) and saves the resumable state (`end_epoch`). The
test split is never seen here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks.crashpoints import crash_point
from tasks.device import pick_precision
from tasks.metrics import classification_metrics
from tasks.params import StageParams, TrainParams
from tasks.train import state as saved_state
from tasks.train.augment import (
    DIHEDRAL,
    class_weights,
    epoch_order,
    prepare,
    resize_batch,
    stage_size,
    variants_for,
)
from tasks.train.ema import WeightAverage
from tasks.train.imagestore import ImageStore, derived
from tasks.train.optim import make_optimizer, make_scheduler, param_groups
from tasks.train.prefetch import Batch, DeviceCopy, Prefetcher
from tasks.train.prefix_onnx import onnx_prefix, wants_onnx_prefix
from tasks.train.runtime import (
    Dist,
    TrainingError,
    gather_objects,
    loss_is_finite,
    replica_difference,
    seed_everything,
    sum_over_ranks,
)
from tasks.train.staging import (
    FeatureCache,
    StagedModel,
    TrainableForward,
    predict_logits,
)

log = logging.getLogger("tasks.train")


@dataclass
class Split:
    images: torch.Tensor | ImageStore  # uint8 (N, 3, S, S), in memory or on disk (the same values either way)
    labels: torch.Tensor  # long (N,)
    soft: torch.Tensor | None = None  # float (N, classes): training targets instead of the labels (train.soft_targets)


@dataclass
class Data:
    classes: list[str]
    train: Split
    val: Split
    feature_spill: Path | None = None  # a folder: cached features live in scratch files there, not in memory


@dataclass
class Saving:
    """Where the resumable state goes and whether a saved one may be continued."""

    path: Path | None = None
    fingerprint: str = ""
    resume: bool = True


@dataclass
class Run:
    """What stays fixed for the whole run (all stages)."""

    model: nn.Module
    data: Data
    params: TrainParams
    mean: list[float]
    std: list[float]
    device: torch.device
    dist: Dist
    saving: Saving
    on_epoch: Callable[[list[dict]], None] | None
    ema: WeightAverage | None = None  # train.ema_decay > 0: the averaged weights are validated and kept
    gen: torch.Generator = field(init=False)  # batch order and variants: the same on every rank
    aug_gen: torch.Generator = field(init=False)  # crop/jitter: per rank

    def __post_init__(self) -> None:
        if self.params.augment == "auto":
            raise TrainingError("train.augment is 'auto': resolve it for the data first (tasks.params.augmentations)")
        self.precision = pick_precision(self.params.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scale_grads)
        n, labels = len(self.data.classes), self.data.train.labels
        self.loss_weight = class_weights(labels, n).to(self.device) if self.params.imbalance == "weighted_loss" else None
        self.sample_weight = class_weights(labels, n)[labels] if self.params.imbalance == "sampler" else None
        self.variants = torch.tensor(variants_for(self.params.augment))
        self.extra_aug = set(self.params.augment) - DIHEDRAL
        # progressive resizing: only full-size epochs may be selected (the checkpoint is used at full size)
        self.any_full = any(s.image_scale == 1.0 and s.epochs > 0 for s in self.params.stages)
        self.copy = DeviceCopy(self.device)  # prefetched batches to the GPU on a side stream (CUDA only)


@dataclass
class StageRun:
    """One stage's live objects."""

    index: int
    stage: StageParams
    size: int
    train_x: torch.Tensor
    val_x: torch.Tensor
    staged: StagedModel
    use_cache: bool
    train_cache: FeatureCache | None
    val_cache: FeatureCache | None
    groups: list[dict]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step_fn: nn.Module
    offsets: torch.Tensor  # each image cycles through the variants from a random start
    selectable: bool


def fit(model: nn.Module, data: Data, params: TrainParams, mean: list[float], std: list[float], seed: int,
        device: torch.device, dist: Dist = Dist(), saving: Saving = Saving(),
        on_epoch: Callable[[list[dict]], None] | None = None) -> tuple[nn.Module, dict, list[dict]]:
    """Run every stage; return the model with the best validation weights, the best record, history."""
    run = Run(model, data, params, mean, std, device, dist, saving, on_epoch)
    run.gen = seed_everything(seed)
    if dist.world > 1:
        torch.manual_seed(seed + 7919 * dist.rank)  # dropout masks: independent per rank
    run.aug_gen = torch.Generator().manual_seed(seed + 1000 * (dist.rank + 1))
    model.to(device).to(memory_format=torch.channels_last)
    progress, best_weights = saved_state.Progress(), copy.deepcopy(model.state_dict())
    resume = saved_state.load(saving.path, saving.fingerprint) if saving.path is not None and saving.resume else None
    if resume is not None:
        model.load_state_dict(resume.model)
        progress, best_weights = resume.progress, resume.best_weights
        run.scaler.load_state_dict(resume.scaler)
        log.info("train: resuming from %s after stage %d epoch %d", saving.path, progress.stage_index, progress.epoch)
    if params.ema_decay > 0:  # a resumed run continues its saved average
        run.ema = WeightAverage(model, params.ema_decay, *((resume.ema, resume.ema_step) if resume else ()))
    previous_optimizer = None
    for index, stage in enumerate(params.stages):
        if stage.epochs == 0 or (resume is not None and index < resume.progress.stage_index):
            continue
        here = resume if resume is not None and index == resume.progress.stage_index else None
        previous_optimizer, best_weights = run_stage(run, index, stage, progress, best_weights, previous_optimizer, here)
        resume = None
    model.load_state_dict(best_weights)
    return model, progress.best, progress.history


def start_stage(run: Run, index: int, stage: StageParams, previous: torch.optim.Optimizer | None) -> StageRun:
    """Trainable set, caches, optimizer and schedule of one stage."""
    params, device = run.params, run.device
    full_train, full_val = run.data.train.images, run.data.val.images
    full = full_train.shape[-1]
    size = stage_size(full, stage.image_scale)
    train_x, val_x = resized(full_train, size), resized(full_val, size)
    staged = StagedModel(run.model, stage.trainable, stage.bn)
    use_cache = params.cache_features and staged.cacheable and not run.extra_aug
    prefix = None
    if use_cache and wants_onnx_prefix(params.prefix_runtime, device, run.precision, len(train_x), len(val_x),
                                       stage.epochs, len(run.variants), params.batch_size):
        prefix = onnx_prefix(staged, size, params.batch_size, torch.get_num_threads())

    def cache(images):
        return FeatureCache(staged, images, run.mean, run.std, device, params.batch_size, run.precision,
                            run.data.feature_spill, prefix)

    groups = param_groups(run.model, stage)
    if not groups:
        raise TrainingError(f"stage '{stage.name}' has nothing to train (trainable={stage.trainable}, bn={stage.bn})")
    optimizer = make_optimizer(groups, stage, previous)
    scheduler = make_scheduler(optimizer, stage, math.ceil(len(train_x) / params.batch_size))
    step_fn: nn.Module = TrainableForward(staged, use_cache)
    if run.dist.world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    if params.compile:
        step_fn = torch.compile(step_fn)
    offsets = torch.randint(len(run.variants), (len(train_x),), generator=run.gen)
    return StageRun(index, stage, size, train_x, val_x, staged, use_cache, cache(train_x) if use_cache else None,
                    cache(val_x) if use_cache else None, groups, optimizer, scheduler, step_fn, offsets,
                    selectable=stage.image_scale == 1.0 or not run.any_full)


def resized(images: torch.Tensor | ImageStore, size: int) -> torch.Tensor | ImageStore:
    """The images at `size` for a low-resolution stage, where they are (a store's copy is a scratch file)."""
    if isinstance(images, torch.Tensor) or images.shape[-1] == size:
        return resize_batch(images, size)
    return derived(images, size, lambda chunk: resize_batch(chunk, size))


def run_stage(run: Run, index: int, stage: StageParams, progress: saved_state.Progress, best_weights: dict,
              previous: torch.optim.Optimizer | None, resume: saved_state.Saved | None):
    sr = start_stage(run, index, stage, previous)
    start_epoch = 0
    if resume is not None:
        sr.optimizer.load_state_dict(resume.optimizer)
        sr.scheduler.load_state_dict(resume.scheduler)
        sr.offsets = resume.offsets
        start_epoch = stage.epochs if progress.stage_done else progress.epoch
        saved_state.set_rng_state(run.gen, run.aug_gen, resume.rng[run.dist.rank])
    else:
        progress.stage_best, progress.bad_epochs = -math.inf, 0
    if start_epoch < stage.epochs:
        n_trainable = sum(p.numel() for g in sr.groups for p in g["params"])
        log.info("stage %d '%s': epochs %d-%d at %d px, trainable=%s (%d params, %s, lr %g, backbone x%g), "
                 "bn=%s, cached prefix=%s", index, stage.name, start_epoch + 1, stage.epochs, sr.size, stage.trainable,
                 n_trainable, stage.optimizer, stage.lr, stage.backbone_lr_mult, stage.bn, sr.use_cache)
    for epoch in range(start_epoch, stage.epochs):
        t0 = time.time()
        loss, seen, waited = train_epoch(run, sr, epoch)
        val_loss, val_metrics = validate(run, sr)
        stop, best_weights = end_epoch(run, sr, progress, best_weights, epoch, loss, seen, val_loss, val_metrics,
                                       time.time() - t0, waited)
        if stop:
            break
    return sr.optimizer, best_weights


def train_epoch(run: Run, sr: StageRun, epoch: int) -> tuple[float, int, float]:
    """One pass over the training images; returns the summed loss and the image count (all ranks) and the seconds
    this rank's steps waited for their batches."""
    params, dist, device = run.params, run.dist, run.device
    sr.staged.train_mode()
    order = epoch_order(len(sr.train_x), run.sample_weight, run.gen)
    choice = run.variants[(sr.offsets + epoch) % len(run.variants)]
    # this rank's share of each batch; a last batch too small to give every rank an image is skipped
    batches = [b[dist.rank :: dist.world] for b in order.split(params.batch_size) if len(b) >= dist.world]
    if sr.use_cache:
        mine = torch.cat(batches)
        for v in run.variants.tolist():
            sr.train_cache.fill(v, mine[choice[mine] == v], desc=f"cache features (variant {v})" if dist.main else None)
    total_loss, seen = 0.0, 0
    ahead = Prefetcher(lambda idx: run.copy(fetch_batch(run, sr, idx, choice[idx])), batches, params.prefetch_batches)
    with ahead:
        bar = tqdm(ahead, total=len(batches), desc=f"{sr.stage.name} {epoch + 1}/{sr.stage.epochs}", unit="batch",
                   leave=False, disable=None if dist.main else True)
        for b, batch in enumerate(bar):
            crash_point(f"train:step:stage={sr.index}:epoch={epoch}:batch={b}")
            x, y = batch_inputs(run, sr, run.copy.arrived(batch))
            loss = train_step(run, sr, x, y, epoch)
            total_loss += loss * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    total_loss, seen = sum_over_ranks([total_loss, float(seen)], dist, device)
    return total_loss, int(seen), ahead.wait_s


def train_step(run: Run, sr: StageRun, x: torch.Tensor, y: torch.Tensor, epoch: int) -> float:
    """One optimizer step on a batch; returns its loss."""
    params, device = run.params, run.device
    with run.precision.autocast(device):
        logits = sr.step_fn(x)
    loss = classification_loss(logits.float(), y, run.loss_weight, params.label_smoothing)
    check_finite(loss, run, sr, epoch)
    sr.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if params.grad_clip > 0:
        run.scaler.unscale_(sr.optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in sr.groups for p in g["params"]], params.grad_clip)
    run.scaler.step(sr.optimizer)
    run.scaler.update()
    sr.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return loss.item()


def fetch_batch(run: Run, sr: StageRun, idx: torch.Tensor, var: torch.Tensor) -> Batch:
    """The rows a batch needs, grouped by variant: cached features or uint8 images, and the targets. Reads only
    (it runs on the prefetch thread): nothing random, nothing computed."""
    groups, targets = [], []
    soft = run.data.train.soft
    for v in var.unique().tolist():
        sub = idx[var == v]
        groups.append((v, sr.train_cache.read(v, sub) if sr.use_cache else sr.train_x[sub]))
        targets.append(run.data.train.labels[sub] if soft is None else soft[sub])
    return Batch(groups, torch.cat(targets))


def batch_inputs(run: Run, sr: StageRun, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the step sees: the cached features, or the images augmented (on the training thread, so the random
    draws come in the same order whether or not batches are prefetched)."""
    inputs = [rows.to(run.device, non_blocking=True) if sr.use_cache else
              prepare(rows, v, run.mean, run.std, run.device, run.extra_aug, run.params.crop_scale, run.params.jitter,
                      run.aug_gen) for v, rows in batch.groups]
    return torch.cat(inputs), batch.targets.to(run.device, non_blocking=True)


def classification_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                        smoothing: float) -> torch.Tensor:
    """Cross-entropy against label indices or against soft targets (rows of class probabilities). Soft targets are
    weighted like the labels they would round to: sum(w * t * -log p) / sum(w * t), so one-hot targets give exactly
    the loss of their indices."""
    if not y.is_floating_point():
        return F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
    t = y * (1 - smoothing) + smoothing / y.shape[1]
    w = torch.ones(y.shape[1], device=y.device) if weight is None else weight
    return -(t * w * logits.log_softmax(1)).sum() / (y * w).sum()


def check_finite(loss: torch.Tensor, run: Run, sr: StageRun, epoch: int) -> None:
    """Stop on a NaN/inf loss (on every rank at once), naming the fix; the last saved state stays."""
    finite, value = loss_is_finite(loss, run.dist)
    if not finite:
        path = run.saving.path
        kept = f"; the last good state is kept in {path}" if path is not None and Path(path).exists() else ""
        raise TrainingError(f"non-finite loss ({value}) in stage '{sr.stage.name}' epoch {epoch + 1}; "
                            f"lower train.stages[{sr.index}].lr (now {sr.stage.lr}){kept}")


def validate(run: Run, sr: StageRun) -> tuple[float, dict]:
    """Validation loss and metrics of the weights that would be kept (the average when train.ema_decay > 0)."""
    val_y = run.data.val.labels
    with run.ema.applied(run.model) if run.ema is not None else contextlib.nullcontext():
        logits = predict_logits(sr.staged, sr.val_x, run.mean, run.std, run.device, run.params.batch_size * 2,
                                sr.val_cache, run.precision)
    val_loss = F.cross_entropy(logits, val_y).item()
    return val_loss, classification_metrics(val_y.numpy(), logits.argmax(1).numpy(), run.data.classes)


def end_epoch(run: Run, sr: StageRun, progress: saved_state.Progress, best_weights: dict, epoch: int, loss: float,
              seen: int, val_loss: float, val: dict, seconds: float, waited: float) -> tuple[bool, dict]:
    """Record the epoch, keep the best weights, decide on early stopping, save the resumable state."""
    params, dist, stage = run.params, run.dist, sr.stage
    record = {
        "stage": stage.name, "stage_index": sr.index, "epoch": epoch + 1, "global_epoch": len(progress.history) + 1,
        "train_loss": loss / max(seen, 1), "val_loss": val_loss, "val_accuracy": val["accuracy"],
        "val_macro_recall": val["macro_recall"], "val_macro_f1": val["macro_f1"],
        "lr": sr.optimizer.param_groups[-1]["lr"], "image_size": sr.size, "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9), "data_wait_s": waited,
    }
    if dist.world > 1:
        record["replica_max_diff"] = replica_difference([p for g in sr.groups for p in g["params"]], dist)
    progress.history.append(record)
    if params.select_metric == "last":  # no selection: every full-size epoch replaces the one before
        score, improved = val["macro_f1"], sr.selectable
    else:
        score = -val_loss if params.select_metric == "loss" else val[params.select_metric]
        improved = sr.selectable and score > progress.best["score"]
    if improved:
        progress.best = {"score": score, "stage": stage.name, "epoch": epoch + 1, "global_epoch": len(progress.history),
                         "metric": params.select_metric, "val": val}
        best_weights = copy.deepcopy(run.ema.shadow if run.ema is not None else run.model.state_dict())
    if score > progress.stage_best:
        progress.stage_best, progress.bad_epochs = score, 0
    else:
        progress.bad_epochs += 1
    stop = 0 < params.early_stopping_patience <= progress.bad_epochs and epoch + 1 < stage.epochs
    if dist.main:
        log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f val_f1 %.4f (%.0fs, %.1f img/s, "
                 "waited %.1fs for data)%s", stage.name, epoch + 1, stage.epochs, record["train_loss"], val_loss,
                 val["accuracy"], val["macro_f1"], seconds, record["images_per_s"], waited,
                 " *" if improved and params.select_metric != "last" else "")
        if stop:
            log.info("%s: no better validation %s for %d epochs: stage stops early", stage.name, params.select_metric,
                     progress.bad_epochs)
    progress.stage_index, progress.epoch = sr.index, epoch + 1
    progress.stage_done = stop or epoch + 1 == stage.epochs
    if run.saving.path is not None:
        rngs = gather_objects(saved_state.rng_state(run.gen, run.aug_gen), dist)
        if dist.main:
            saved_state.save(run.saving.path, run.saving.fingerprint, saved_state.Saved(
                progress=progress, model=run.model.state_dict(), best_weights=best_weights,
                optimizer=sr.optimizer.state_dict(), scheduler=sr.scheduler.state_dict(),
                scaler=run.scaler.state_dict(), offsets=sr.offsets, rng=rngs,
                ema=run.ema.shadow if run.ema else None, ema_step=run.ema.step if run.ema else 0))
    if run.on_epoch is not None and dist.main:
        run.on_epoch(progress.history)
    return stop, best_weights
