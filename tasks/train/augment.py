"""Training-time augmentation and sampling as tensor ops on the training device.

The default augmentation is the eight flips/90-degree rotations of the square (the dihedral group
D4): right for electroluminescence images (a cell has no preferred orientation) and, being a finite
set, it lets the trainer cache the output of frozen layers per variant exactly. Random crops and
brightness/contrast jitter are available too; they switch that cache off.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tasks.tensors import apply_variant, normalise, standardise

DIHEDRAL = {"hflip", "vflip", "rot90"}


def variants_for(augment: list[str]) -> list[int]:
    """Indices (0..7) of the D4 variants the augment list can produce; 0 is the identity."""
    rots = [0, 1, 2, 3] if "rot90" in augment else [0]
    flips = [False, True] if ("hflip" in augment or "vflip" in augment) else [False]
    if "rot90" not in augment and "hflip" in augment and "vflip" in augment:
        rots = [0, 2]  # hflip+vflip together give the 180-degree rotation
    return sorted({r + 4 * f for r in rots for f in flips})


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


def prepare(x_uint8: torch.Tensor, variant: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
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


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (a class with no examples gets 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def epoch_order(n: int, sample_weight: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """A shuffled pass over the training set, or with `sample_weight` a class-balanced draw with replacement."""
    if sample_weight is not None:
        return torch.multinomial(sample_weight, n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


def stage_size(full: int, scale: float) -> int:
    """The image size of a stage at `image_scale` `scale` (a multiple of 8, at least 32)."""
    return full if scale == 1.0 else max(32, int(round(full * scale / 8)) * 8)


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
