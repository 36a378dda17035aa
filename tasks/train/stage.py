"""Train stage: validated manifest + pretrained weights -> the best checkpoint, per-epoch history, summary.

Multi-GPU / multi-node: start it under torchrun (`torchrun --nproc_per_node 4 -m tasks.train`);
each rank trains on its share of every batch and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import logging
import time
from argparse import Namespace
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as torch_dist

from tasks import backbones
from tasks.checkpoint import Checkpoint, save_checkpoint
from tasks.device import pick_device
from tasks.entry import Option, stage_main
from tasks.files import atomic_path, read_json, write_json
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.manifest import classes_of, read_manifest
from tasks.params import Params, TrainParams, augmentations
from tasks.preprocess import Preprocessing
from tasks.tensors import split_arrays, split_labels, split_soft_targets
from tasks.train import state as saved_state
from tasks.train.budget import Plan, plan
from tasks.train.imagestore import cache_root, split_store, store_folder
from tasks.train.loop import Data, Saving, Split, fit
from tasks.train.runtime import (
    Dist,
    TrainingError,
    effective_image_size,
    init_distributed,
)

log = logging.getLogger("tasks.train")


def run(manifest_path: Path, images_dir: Path, base_dir: Path, params: TrainParams, seed: int,
        checkpoint_path: Path, metrics_path: Path, history_path: Path, workers: int = 4,
        state_path: Path | None = None, resume: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Read data and pretrained weights, fine-tune, write the best checkpoint.

    With `state_path`, progress is saved there after every epoch; a rerun with `resume` continues
    from it when data, weights and params are unchanged (e.g. after the process was killed).
    """
    dist = init_distributed()
    try:
        return _run(manifest_path, images_dir, base_dir, params, seed, checkpoint_path, metrics_path, history_path,
                    workers, Saving(state_path, resume=resume), dist, max_pixels)
    finally:
        if dist.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def deterministic(compiled: bool) -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)`. The public function also sets torch.compile's
    (inductor's) own flag, and importing inductor's config costs a process 1.3 s; a run that does not compile sets
    the one flag eager code reads and leaves inductor unimported (tests/test_train.py checks both paths)."""
    if compiled or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)


def _run(manifest_path, images_dir, base_dir, params: TrainParams, seed, checkpoint_path, metrics_path, history_path,
         workers, saving: Saving, dist: Dist, max_pixels: int) -> dict:
    if params.threads:
        torch.set_num_threads(params.threads)
    device = pick_device(dist.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        deterministic(compiled=params.compile)
    manifest = read_manifest(manifest_path)
    classes = classes_of(manifest)
    for split in ("train", "val"):
        if not (manifest["split"] == split).any():
            raise TrainingError(f"{manifest_path}: no '{split}' images; check data.split fractions")
    base_meta = read_json(base_dir / "meta.json")
    size = effective_image_size(params, device)
    model = backbones.build(base_meta)
    model.load_state_dict(torch.load(base_dir / "weights.pt", map_location="cpu", weights_only=True))
    backbones.with_new_head(model, len(classes), seed)
    weights_pre = Preprocessing.from_dict(base_meta["preprocessing"])
    preprocessing = Preprocessing(size=size, mean=weights_pre.mean, std=weights_pre.std)
    mean, std = list(preprocessing.mean), list(preprocessing.std)
    layout, params = place_data(model, manifest, images_dir, params, size, dist)
    if saving.path is not None:
        saving.fingerprint = saved_state.fingerprint(manifest_path, base_dir / "weights.pt", params, seed, dist.world)
    t0 = time.time()
    if layout.images == "disk":
        train_x, val_x = (split_store(manifest, images_dir, split, size, workers, max_pixels, cache_root(images_dir))
                          for split in ("train", "val"))
        train_y, val_y = (split_labels(manifest, split, classes) for split in ("train", "val"))
    else:
        train_x, train_y = split_arrays(manifest, images_dir, "train", classes, size, workers, max_pixels)
        val_x, val_y = split_arrays(manifest, images_dir, "val", classes, size, workers, max_pixels)
    if dist.main:
        log.info("train: %d train / %d val images at %d px on %s (%d threads%s), classes %s", len(train_x),
                 len(val_x), size, device, torch.get_num_threads(),
                 f", {dist.world} processes" if dist.world > 1 else "", classes)
    soft = split_soft_targets(manifest, "train", classes, "defective") if params.soft_targets else None
    data = Data(classes, Split(train_x, train_y, soft), Split(val_x, val_y),
                feature_spill=cache_root(images_dir) if layout.features == "disk" else None)
    model, best, history = fit(model, data, params, mean, std, seed, device, dist, saving,
                               on_epoch=lambda h: write_history(history_path, h))
    wall = time.time() - t0
    summary = {"best": best, "wall_time_s": round(wall, 1), "image_size": size, "device": str(device),
               "processes": dist.world, "n_train": len(train_x), "n_val": len(val_x), "epochs": len(history),
               "augment": list(params.augment), "data_store": layout.images, "feature_store": layout.features}
    if dist.main:
        save_checkpoint(checkpoint_path, model, Checkpoint(
            classes=classes, preprocessing=preprocessing, base=base_meta,
            config={"train": params.model_dump(mode="json"), "seed": seed},
            best={k: v for k, v in best.items() if k != "val"}))
        write_history(history_path, history)  # also when a resumed run had nothing left to train
        write_json(metrics_path, summary)
        if saving.path is not None:
            Path(saving.path).unlink(missing_ok=True)  # the checkpoint is written: nothing left to resume
        kept = ("the last epoch, val macro_f1" if best["metric"] == "last" else f"best {best['metric']}")
        log.info("train: kept %s=%.4f at stage '%s' epoch %d; %.0fs; checkpoint %s", kept, best["score"],
                 best["stage"], best["epoch"], wall, checkpoint_path)
    return summary


def place_data(model, manifest: pd.DataFrame, images_dir: Path, params: TrainParams, size: int,
               dist: Dist) -> tuple[Plan, TrainParams]:
    """Where images and cached features go within the memory budget (logged); fails here, before any decoding,
    when the run cannot fit. Recomputing frozen layers turns the feature cache off in the params the run uses."""
    root = cache_root(images_dir)
    n_train, n_val = (int((manifest["split"] == split).sum()) for split in ("train", "val"))
    stored = all((store_folder(manifest, images_dir, split, size, root)[0] / "header.json").exists()
                 for split in ("train", "val"))
    layout = plan(model, params, size, n_train, n_val, root, stored_already=stored)
    if dist.main:
        log.info("train: %s", layout.describe())
        if layout.features == "recompute":
            log.warning("train: no room for the feature cache in memory or on disk: frozen layers run every step "
                        "(slower; results equal the cached run's up to float rounding)")
    if layout.features == "recompute":
        params = params.model_copy(update={"cache_features": False})
    return layout, params


def write_history(path: Path, history: list[dict]) -> None:
    """Per-epoch metrics as a CSV that `dvc plots show` draws (x: global_epoch); rewritten each epoch."""
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def main(argv: list[str] | None = None) -> None:
    resume = Option(("--resume",), dict(action=argparse.BooleanOptionalAction, default=True,
                    help="continue from --state when it is from a run with the same data, weights and params"))
    stage_main("train", __doc__, argv, _from_params, resume,
               state=("models/train_state.pt", "training state saved after every epoch (removed when training ends)"))


def _from_params(p: Params, args: Namespace) -> None:
    train = p.train.model_copy(update={"augment": augmentations(p.data, p.train)})  # `auto` resolved for the data
    run(args.manifest, args.images, args.base, train, p.seed, args.checkpoint, args.metrics, args.history,
        workers=p.data.workers, state_path=args.state, resume=args.resume, max_pixels=p.data.max_pixels)
