"""Train stage: staged fine-tuning (frozen backbone first, then unfrozen), CPU or GPU.

Each stage in `train.stages` says what trains (`head`, `all`, or the last N backbone blocks),
for how many epochs, with which learning rates. Between stages the optimizer and the
warmup+cosine schedule are rebuilt for the new set of trainable parameters.

Feature caching: layers that a stage keeps frozen run in eval mode, so their output for a
given (image, augmentation variant) never changes. When augmentation is the finite set of
flips/90-degree rotations, the trainer computes that output once per pair, on first use, and
trains the rest of the network on the cached tensors. This is exactly the same computation
as the uncached loop (switch: `train.cache_features`), only faster.

Checkpoint selection uses the validation split only; the test split is never loaded here.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks import models
from tasks.data import apply_variant, class_weights, normalise, resize_batch, split_arrays, variants_for
from tasks.ingest import read_manifest
from tasks.io import atomic_path, read_json, write_json
from tasks.metrics import classification_metrics
from tasks.params import StageParams, TrainParams

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (bad params, non-finite loss); the message says why."""


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def effective_image_size(params: TrainParams, device: torch.device) -> int:
    """Full `image_size` on accelerators; on CPU capped at `cpu_image_size` to fit the time budget."""
    if device.type == "cpu" and params.cpu_image_size:
        return min(params.image_size, params.cpu_image_size)
    return params.image_size


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
        self.parts = parts
        self.bn_policy = bn_policy

    def train_mode(self) -> None:
        """Trainable modules in train mode; frozen ones (and all BN under policy `eval`) in eval mode."""
        self.model.train()
        for m in self.model.modules():
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
            if self.bn_policy == "eval" and isinstance(m, nn.modules.batchnorm._BatchNorm):
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
    """Prefix outputs per (variant, image), computed on first use."""

    def __init__(self, staged: StagedModel, images: torch.Tensor, mean, std, device, batch_size: int):
        self.staged, self.images, self.mean, self.std = staged, images, mean, std
        self.device, self.batch_size = device, batch_size
        self.store: dict[int, torch.Tensor] = {}
        self.done: dict[int, torch.Tensor] = {}

    def get(self, variant: int, idx: torch.Tensor) -> torch.Tensor:
        done = self.done.setdefault(variant, torch.zeros(len(self.images), dtype=torch.bool))
        missing = idx[~done[idx]]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            x = prepare(self.images[chunk], variant, self.mean, self.std, self.device)
            with eval_mode(self.staged.model), torch.no_grad():
                f = self.staged.prefix(x).float().cpu()
            if variant not in self.store:  # same memory format as the live path, so the same kernels run
                fmt = torch.channels_last if f.ndim == 4 else torch.contiguous_format
                self.store[variant] = torch.empty((len(self.images), *f.shape[1:]), dtype=f.dtype).to(memory_format=fmt)
            self.store[variant][chunk] = f
            done[chunk] = True
        return self.store[variant][idx]


def prepare(x_uint8: torch.Tensor, variant: int, mean, std, device: torch.device) -> torch.Tensor:
    x = normalise(apply_variant(x_uint8, variant).to(device, non_blocking=True), mean, std)
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
            "lr": stage.lr if is_head else stage.lr * stage.backbone_lr_mult,
            "weight_decay": 0.0 if no_decay else stage.weight_decay,
        })
    return out


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@torch.no_grad()
def predict_logits(staged_or_model, images: torch.Tensor, mean, std, device, batch_size: int,
                   cache: FeatureCache | None = None) -> torch.Tensor:
    """Logits for uint8 images (identity variant), in eval mode."""
    model = staged_or_model.model if isinstance(staged_or_model, StagedModel) else staged_or_model
    out = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(images)))
            if cache is not None:
                out.append(staged_or_model.suffix(cache.get(0, idx).to(device)).float().cpu())
            else:
                out.append(model(prepare(images[idx], 0, mean, std, device)).float().cpu())
    return torch.cat(out)


def select_score(metrics: dict, loss: float, name: str) -> float:
    return -loss if name == "loss" else metrics[name]


def fit(model: nn.Module, classes: list[str], train_x: torch.Tensor, train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, params: TrainParams, mean, std, seed: int,
        device: torch.device, on_epoch=None) -> tuple[nn.Module, dict, list[dict]]:
    """Run every stage; return the model with the best validation weights, the best record, history."""
    gen = seed_everything(seed)
    model.to(device).to(memory_format=torch.channels_last)
    n_classes = len(classes)
    weight = class_weights(train_y, n_classes).to(device) if params.class_weighting else None
    variants = torch.tensor(variants_for(params.augment))
    best = {"score": -math.inf}
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict] = []
    global_epoch = 0
    full_train_x, full_val_x = train_x, val_x
    # progressive resizing: epochs of stages at image_scale < 1 are cheaper; only full-size epochs
    # may be selected as best (the checkpoint is evaluated and exported at full size)
    any_full = any(s.image_scale == 1.0 and s.epochs > 0 for s in params.stages)
    for stage_index, stage in enumerate(params.stages):
        if stage.epochs == 0:
            continue
        full = full_train_x.shape[-1]
        size = full if stage.image_scale == 1.0 else max(32, int(round(full * stage.image_scale / 8)) * 8)
        train_x, val_x = resize_batch(full_train_x, size), resize_batch(full_val_x, size)
        selectable = stage.image_scale == 1.0 or not any_full
        staged = StagedModel(model, stage.trainable, stage.bn)
        use_cache = params.cache_features and staged.cacheable
        train_cache = FeatureCache(staged, train_x, mean, std, device, params.batch_size) if use_cache else None
        val_cache = FeatureCache(staged, val_x, mean, std, device, params.batch_size) if use_cache else None
        groups = param_groups(model, stage)
        n_trainable = sum(p.numel() for g in groups for p in g["params"])
        log.info("stage %d '%s': %d epochs at %d px, trainable=%s (%d params), cached prefix=%s",
                 stage_index, stage.name, stage.epochs, size, stage.trainable, n_trainable, use_cache)
        optimizer = torch.optim.AdamW(groups)
        steps_per_epoch = math.ceil(len(train_x) / params.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(stage.epochs * steps_per_epoch, int(stage.warmup_epochs * steps_per_epoch))
        )
        # each image cycles through the augmentation variants from a random start, so every
        # variant is seen (and cached) once per len(variants) epochs instead of at random
        offsets = torch.randint(len(variants), (len(train_x),), generator=gen)
        for epoch in range(stage.epochs):
            t0 = time.time()
            staged.train_mode()
            order = torch.randperm(len(train_x), generator=gen)
            choice = variants[(offsets + epoch) % len(variants)]
            total_loss, seen = 0.0, 0
            bar = tqdm(range(0, len(order), params.batch_size), desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
                       unit="batch", leave=False, disable=None)
            for start in bar:
                idx = order[start : start + params.batch_size]
                var = choice[idx]
                inputs, targets = [], []
                for v in var.unique().tolist():
                    sub = idx[var == v]
                    inputs.append(train_cache.get(v, sub).to(device) if use_cache
                                  else prepare(train_x[sub], v, mean, std, device))
                    targets.append(train_y[sub])
                x, y = torch.cat(inputs), torch.cat(targets).to(device)
                logits = staged.suffix(x) if use_cache else model(x)
                loss = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=params.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) in stage '{stage.name}' epoch {epoch + 1}; "
                        f"lower train.stages[{stage_index}].lr (now {stage.lr})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if params.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], params.grad_clip)
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            val_logits = predict_logits(staged if use_cache else model, val_x, mean, std, device,
                                        params.batch_size * 2, val_cache)
            val_loss = F.cross_entropy(val_logits, val_y).item()
            val_metrics = classification_metrics(val_y.numpy(), val_logits.argmax(1).numpy(), classes)
            global_epoch += 1
            record = {
                "stage": stage.name, "stage_index": stage_index, "epoch": epoch + 1, "global_epoch": global_epoch,
                "train_loss": total_loss / max(seen, 1), "val_loss": val_loss,
                "val_accuracy": val_metrics["accuracy"], "val_macro_recall": val_metrics["macro_recall"],
                "val_macro_f1": val_metrics["macro_f1"], "image_size": size, "seconds": time.time() - t0,
                "images_per_s": seen / max(time.time() - t0, 1e-9),
            }
            history.append(record)
            score = select_score(val_metrics, val_loss, params.select_metric)
            improved = selectable and score > best["score"]
            if improved:
                best = {"score": score, "stage": stage.name, "epoch": epoch + 1, "global_epoch": global_epoch,
                        "metric": params.select_metric, "val": val_metrics}
                best_state = copy.deepcopy(model.state_dict())
            log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f val_f1 %.4f (%.0fs, %.1f img/s)%s",
                     stage.name, epoch + 1, stage.epochs, record["train_loss"], val_loss, val_metrics["accuracy"],
                     val_metrics["macro_f1"], record["seconds"], record["images_per_s"], " *" if improved else "")
            if on_epoch is not None:
                on_epoch(history)
    model.load_state_dict(best_state)
    return model, best, history


def run(manifest_path: Path, images_dir: Path, base_dir: Path, params: TrainParams, seed: int,
        checkpoint_path: Path, metrics_path: Path, history_path: Path, workers: int = 4) -> dict:
    """The train stage: read data and pretrained weights, fine-tune, write the best checkpoint."""
    if params.threads:
        torch.set_num_threads(params.threads)
    device = pick_device()
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
    t0 = time.time()
    train_x, train_y = split_arrays(manifest, images_dir, "train", classes, size, workers)
    val_x, val_y = split_arrays(manifest, images_dir, "val", classes, size, workers)
    log.info("train: %d train / %d val images at %d px on %s (%d threads), classes %s", len(train_x), len(val_x),
             size, device, torch.get_num_threads(), classes)
    model, best, history = fit(model, classes, train_x, train_y, val_x, val_y, params, mean, std, seed, device,
                               on_epoch=lambda h: write_history(history_path, h))
    wall = time.time() - t0
    preprocessing = models.Preprocessing(size=size, mean=tuple(mean), std=tuple(std)).to_dict()
    save_checkpoint(checkpoint_path, model, classes, base_meta, preprocessing,
                    {"train": params.model_dump(mode="json"), "seed": seed}, {k: v for k, v in best.items() if k != "val"})
    summary = {"best": best, "wall_time_s": round(wall, 1), "image_size": size, "device": str(device),
               "n_train": len(train_x), "n_val": len(val_x), "epochs": len(history)}
    write_json(metrics_path, summary)
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
