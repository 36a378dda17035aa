"""Before training: will the run fit its memory budget, and where do images and cached features go?

The estimate counts what grows with the data: the decoded images (N x 3 x S x S bytes, plus the
resized copy of a low-resolution stage), the feature cache (per cached stage: every training image in
each variant it will see, every validation image once, float32) and per-image bookkeeping; plus what
does not: the process as it is now (runtime, model, tables: measured) and, per parameter, a gradient,
two optimizer moments and the best-weights copy. Activations are not counted (they depend on the batch,
not on N). Images move to disk first (uint8, cheap to read back), then the feature cache; with no room
on disk either, frozen layers are recomputed every step. When even the fixed part exceeds the budget,
or what must go to disk does not fit the free space, training stops here, naming the numbers.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasks.params import TrainParams
from tasks.train.augment import DIHEDRAL, stage_size, variants_for
from tasks.train.runtime import TrainingError
from tasks.train.staging import StagedModel, eval_mode

MB = 1 << 20
BOOKKEEPING_PER_IMAGE = 64  # bytes: label, variant offset, epoch order, cache masks


@dataclass(frozen=True)
class Plan:
    images: str  # "ram" | "disk"
    features: str  # "ram" | "disk" | "recompute" | "none" (nothing cached)
    budget: int
    need: dict  # bytes by item

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / MB:.0f} MB" for k, v in self.need.items())
        return (f"memory budget {self.budget / MB:.0f} MB; estimate: {parts}; images: {self.images}, "
                f"feature cache: {self.features}")


def machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_rss() -> int:
    """This process's resident memory now (bytes)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def budget_bytes(params: TrainParams) -> int:
    if params.memory_budget_mb:
        return params.memory_budget_mb * MB
    return int(params.memory_fraction * machine_ram())


def free_disk(folder: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `folder`."""
    existing = next(p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists())
    return shutil.disk_usage(existing).free


def feature_bytes(model: nn.Module, params: TrainParams, size: int, n_train: int, n_val: int) -> int:
    """The largest feature cache of any stage (stages' caches do not live at the same time)."""
    if not params.cache_features or set(params.augment) - DIHEDRAL:
        return 0
    flags = {p: p.requires_grad for p in model.parameters()}
    variants, largest = len(variants_for(params.augment)), 0
    try:
        for stage in params.stages:
            staged = StagedModel(model, stage.trainable, stage.bn)
            if stage.epochs == 0 or not staged.cacheable:
                continue
            s = stage_size(size, stage.image_scale)
            with eval_mode(model), torch.no_grad():
                per_image = staged.prefix(torch.zeros((1, 3, s, s))).numel() * 4
            largest = max(largest, per_image * (n_train * min(stage.epochs, variants) + n_val))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return largest


def plan(model: nn.Module, params: TrainParams, size: int, n_train: int, n_val: int, disk_folder: Path,
         stored_already: bool = False) -> Plan:
    """Where images and features go, within the budget; raises TrainingError (with the numbers) if nothing fits."""
    n = n_train + n_val
    images = n * 3 * size * size
    images += max((n * 3 * stage_size(size, s.image_scale) ** 2 for s in params.stages
                   if s.epochs and s.image_scale != 1.0), default=0)
    features = feature_bytes(model, params, size, n_train, n_val)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fixed = {"process now": process_rss(), "gradients, optimizer and best copy": 4 * weights,
             "per-image bookkeeping": n * BOOKKEEPING_PER_IMAGE}
    budget, base = budget_bytes(params), sum(fixed.values())
    numbers = {**fixed, "images": images, "feature cache": features}
    if base > budget:
        raise TrainingError(
            f"memory budget {budget / MB:.0f} MB (train.memory_budget_mb / memory_fraction) is smaller than the "
            f"run needs before any data: {', '.join(f'{k} {v / MB:.0f} MB' for k, v in fixed.items())} = "
            f"{base / MB:.0f} MB; raise the budget or pick a smaller model")
    fits = lambda *items: base + sum(items) <= budget  # noqa: E731
    free = free_disk(disk_folder)
    on_disk_images = 0 if stored_already else n * 3 * size * size
    features_in_ram = 0 if params.feature_store == "disk" else features
    if params.data_store == "ram" or (params.data_store == "auto" and fits(images, features_in_ram)):
        where_images, disk_need = "ram", 0
    else:
        where_images, disk_need = "disk", on_disk_images + (images - n * 3 * size * size)
    in_ram_images = images if where_images == "ram" else 0
    if features == 0:
        where_features = "none"
    elif params.feature_store == "ram" or (params.feature_store == "auto" and fits(in_ram_images, features)):
        where_features = "ram"
    elif params.feature_store == "disk" or free >= disk_need + features:
        where_features = "disk"
        disk_need += features
    else:
        where_features = "recompute"
    if disk_need > free:
        raise TrainingError(f"images and features on disk need {disk_need / MB:.0f} MB in {disk_folder} but only "
                            f"{free / MB:.0f} MB is free (memory budget {budget / MB:.0f} MB, estimate "
                            f"{(base + images + features) / MB:.0f} MB); free disk space or raise the budget")
    used = base + in_ram_images + (features if where_features == "ram" else 0)
    if used > budget:
        raise TrainingError(f"memory budget {budget / MB:.0f} MB is smaller than the estimate {used / MB:.0f} MB with "
                            f"images in {where_images} and the feature cache in {where_features} "
                            f"({', '.join(f'{k} {v / MB:.0f} MB' for k, v in numbers.items())}); set "
                            f"train.data_store / train.feature_store to auto or disk, or raise the budget")
    return Plan(where_images, where_features, budget, numbers)
