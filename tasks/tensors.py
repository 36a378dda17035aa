"""Images as tensors for the torch stages (train, evaluate, export): decoding, normalisation, prediction.

Files are decoded by the one decode path (`tasks.images.load_for_model`, in threads) into one uint8
tensor (N, 3, S, S), or batch by batch when a pass needs them (`DecodedOnDemand`; `batches` is the one
loop that walks either). `normalise` is the only implementation of input normalisation: training feeds
the network through it and the exported ONNX graph contains it (`tasks.export.onnx_graph`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from tasks.device import Precision
from tasks.images import DEFAULT_MAX_PIXELS, load_for_model


def decode_images(paths: list[Path], size: int, workers: int = 4, desc: str | None = "decode",
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode and resize `paths` in parallel into a uint8 tensor (N, 3, size, size); `desc` None: no progress bar."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = torch.from_numpy(load_for_model(paths[i], size, max_pixels))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(tqdm(pool.map(one, range(len(paths))), total=len(paths), desc=desc, unit="img", leave=False,
                  disable=True if desc is None else None))
    return out


class DecodedOnDemand:
    """A split's images for one pass in order (evaluation): a slice is decoded when asked for, so memory holds one
    batch, not the split. The same pixels, in the same batches, as slicing the decoded tensor."""

    def __init__(self, paths: list[Path], size: int, workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths, self.size, self.workers, self.max_pixels = list(paths), size, workers, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, part: slice) -> torch.Tensor:
        return decode_images(self.paths[part], self.size, self.workers, None, self.max_pixels)


Images = torch.Tensor | DecodedOnDemand  # uint8 (N, 3, S, S), decoded or decoded when sliced


def batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """`images[start : start + batch_size]` from the first image on, the last batch possibly shorter: the one
    batching loop over a split. On `DecodedOnDemand` a batch is decoded when it is reached, so a pass holds one
    batch; on a decoded tensor the batches are the same pixels (so the same numbers come out)."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def split_arrays(manifest: pd.DataFrame, images_dir: Path, split: str, classes: list[str], size: int,
                 workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and label indices of one split of a manifest."""
    rows = manifest[manifest["split"] == split]
    labels = split_labels(manifest, split, classes)
    images = decode_images([Path(images_dir) / p for p in rows["path"]], size, workers, f"decode {split}", max_pixels)
    return images, labels


def split_labels(manifest: pd.DataFrame, split: str, classes: list[str]) -> torch.Tensor:
    """The label indices (long) of one split's rows, in manifest order."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[str(label)] for label in manifest.loc[manifest["split"] == split, "label"]],
                        dtype=torch.long)


def split_soft_targets(manifest: pd.DataFrame, split: str, classes: list[str], positive: str) -> torch.Tensor:
    """(N, 2) float targets of one split's rows from the manifest's `probability` column: `positive` gets the
    probability, the other class the rest (ELPV: P(defective) as the experts rated the cell)."""
    if "probability" not in manifest.columns or len(classes) != 2 or positive not in classes:
        raise ValueError(f"soft targets need a 'probability' column and two classes including {positive!r}; "
                         f"got columns {list(manifest.columns)} and classes {classes}")
    p = torch.tensor(manifest.loc[manifest["split"] == split, "probability"].astype(float).to_numpy(),
                     dtype=torch.float32)
    soft = torch.empty(len(p), 2)
    soft[:, classes.index(positive)], soft[:, 1 - classes.index(positive)] = p, 1 - p
    return soft


def apply_variant(x: torch.Tensor, variant: int) -> torch.Tensor:
    """Variant v (0..7) of the dihedral group of a square batch (N, C, H, W): rotate by (v % 4) * 90 degrees, then
    mirror left-right if v >= 4. Variant 0 is the identity, 4 the horizontal flip. Used by training's augmentation
    and by test-time augmentation (`tasks.tta`)."""
    turns = variant % 4  # rot90 as flips and a transpose: the same values, and ONNX's classic exporter knows them
    if turns == 1:
        x = x.flip(3).transpose(2, 3)
    elif turns == 2:
        x = x.flip(2).flip(3)
    elif turns == 3:
        x = x.transpose(2, 3).flip(3)
    return torch.flip(x, dims=(3,)) if variant >= 4 else x


def standardise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Float 0..1 images -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def normalise(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 0..255 images -> the network's float input. The one normalisation (training and ONNX graph)."""
    return standardise(x_uint8.float() / 255.0, mean, std)


def model_input(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                device: torch.device) -> torch.Tensor:
    """A uint8 batch -> the normalised channels-last float batch on `device`."""
    x = x_uint8.to(device, non_blocking=True)
    return normalise(x, mean, std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_logits(model: nn.Module, images: Images, mean: Sequence[float], std: Sequence[float],
                   device: torch.device, batch_size: int, precision: Precision = Precision()) -> torch.Tensor:
    """Logits (float32, CPU) for uint8 images, in eval mode; the model's own modes are restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    out = []
    try:
        with precision.autocast(torch.device(device)):
            for batch in batches(images, batch_size):
                out.append(model(model_input(batch, mean, std, device)).float().cpu())
    finally:
        for m, training in modes.items():
            m.training = training
    return torch.cat(out) if out else torch.zeros((0, 0))
