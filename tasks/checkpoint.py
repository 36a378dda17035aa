"""The trained checkpoint: weights plus everything needed to rebuild and use them.

Written by the train stage, read by evaluate and export. The architecture comes from the checkpoint
itself (the backbone metadata `fetch_model` recorded), the classes give the output order, and the
preprocessing record (`tasks.preprocess.Preprocessing`) says how files become inputs. It is read
with `weights_only=True`: a checkpoint cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tasks import backbones
from tasks.files import atomic_path
from tasks.preprocess import Preprocessing


@dataclass(frozen=True)
class Checkpoint:
    classes: list[str]
    preprocessing: Preprocessing
    base: dict  # the backbone metadata from fetch_model (source, arch, weights, sha256, builder...)
    config: dict = field(default_factory=dict)  # {"train": train params, "seed": ...}
    best: dict = field(default_factory=dict)  # which epoch was selected, on which validation metric


def save_checkpoint(path: Path, model: nn.Module, info: Checkpoint) -> None:
    checkpoint = {
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "classes": list(info.classes),
        "base": info.base,
        "preprocessing": info.preprocessing.to_dict(),
        "config": info.config,
        "best": info.best,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path) -> tuple[nn.Module, Checkpoint]:
    """The model (eval mode) and what the checkpoint says about it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path} (run the train stage)") from None
    info = Checkpoint(classes=[str(c) for c in ckpt["classes"]],
                      preprocessing=Preprocessing.from_dict(ckpt["preprocessing"]), base=ckpt["base"],
                      config=ckpt.get("config") or {}, best=ckpt.get("best") or {})
    model = backbones.build(info.base, num_classes=len(info.classes))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), info
