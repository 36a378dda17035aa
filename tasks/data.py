"""Decoded image tensors and dihedral (D4) augmentation shared by training and evaluation.

Images are decoded once (in threads), resized to the model's input size and kept as one uint8
tensor (N, 3, S, S) in memory (ELPV at 224 px: about 400 MB); augmentation then runs as tensor
ops on the training device, so no DataLoader workers are needed. The default augmentation is
the eight flips/90-degree rotations of the square: they suit electroluminescence images (a
cell has no preferred orientation) and, being a finite set, let the trainer cache the output
of frozen layers per variant and stay equivalent to augmenting on the fly. Random crops and
brightness/contrast jitter are available too; they switch that cache off.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from tasks.images import load_for_model


def decode_images(paths: list[Path], size: int, workers: int = 4, desc: str = "decode") -> torch.Tensor:
    """Decode and resize `paths` in parallel into a uint8 tensor (N, 3, size, size)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = torch.from_numpy(load_for_model(paths[i], size))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(tqdm(pool.map(one, range(len(paths))), total=len(paths), desc=desc, unit="img", leave=False, disable=None))
    return out


def split_arrays(manifest: pd.DataFrame, images_dir: Path, split: str, classes: list[str], size: int,
                 workers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    rows = manifest[manifest["split"] == split]
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[str(label)] for label in rows["label"]], dtype=torch.long)
    images = decode_images([Path(images_dir) / p for p in rows["path"]], size, workers, desc=f"decode {split}")
    return images, labels


def variants_for(augment: list[str]) -> list[int]:
    """Indices (0..7) of the D4 variants the augment list can produce; 0 is the identity."""
    rots = [0, 1, 2, 3] if "rot90" in augment else [0]
    flips = [False, True] if ("hflip" in augment or "vflip" in augment) else [False]
    if "rot90" not in augment and "hflip" in augment and "vflip" in augment:
        rots = [0, 2]  # hflip+vflip together give the 180-degree rotation
    return sorted({r + 4 * f for r in rots for f in flips})


def apply_variant(x: torch.Tensor, variant: int) -> torch.Tensor:
    """Variant v of a batch (N, C, H, W): rotate by (v % 4) * 90 degrees, then flip if v >= 4."""
    x = torch.rot90(x, variant % 4, dims=(2, 3)) if variant % 4 else x
    return torch.flip(x, dims=(3,)) if variant >= 4 else x


DIHEDRAL = {"hflip", "vflip", "rot90"}


def random_crop_resize(x: torch.Tensor, min_scale: float, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random square crop covering `min_scale`..1 of the area, resized back (float input)."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    scales = min_scale + (1 - min_scale) * torch.rand(n, generator=gen)
    where = torch.rand((n, 2), generator=gen)
    for i in range(n):
        side = max(8, int(round(min(h, w) * scales[i].sqrt().item())))
        top, left = int(where[i, 0] * (h - side)), int(where[i, 1] * (w - side))
        crop = x[i : i + 1, :, top : top + side, left : left + side]
        out[i : i + 1] = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                                         antialias=False)
    return out


def random_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Per image: brightness and contrast scaled by factors in [1 - strength, 1 + strength] (float 0..1
    input; the same factor for every channel, which suits grayscale images such as EL cells)."""
    n = x.shape[0]
    factors = 1 + strength * (2 * torch.rand((n, 2), generator=gen) - 1)
    brightness = factors[:, 0].view(n, 1, 1, 1).to(x.device)
    contrast = factors[:, 1].view(n, 1, 1, 1).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).mul_(brightness).clamp_(0.0, 1.0)


def normalise(x_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return standardise(x_uint8.float().div_(255.0), mean, std)


def standardise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Float 0..1 images -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a class with no examples gets 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def resize_batch(images: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, 3, size, size), bilinear with antialiasing, in chunks."""
    if images.shape[-1] == size:
        return images
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = torch.nn.functional.interpolate(images[i : i + chunk].float(), size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out
