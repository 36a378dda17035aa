"""The preprocessing contract: how an image file becomes the model's input. Torch-free.

One record, `Preprocessing`, travels with the model: training writes it into the checkpoint, export
writes it into the ONNX metadata (key `preprocessing`), and every consumer (evaluation, the gate,
serving, batch prediction) reads it back with `Preprocessing.from_dict` and calls `load` on files.
So nothing downstream re-derives sizes or statistics from params.

The model's input is uint8 RGB, NCHW, `size x size`: EXIF-upright, converted to RGB (tasks/images.py),
squashed (resized without crop, so a defect at the border is never cut off) with bilinear
antialiasing. Normalisation with `mean`/`std` happens inside the network (training) and inside the
ONNX graph (export), with one implementation (`tasks.tensors.normalise`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tasks.images import DEFAULT_MAX_PIXELS, load_for_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FIELDS = ("size", "mean", "std", "resize", "interpolation", "channels", "dtype", "layout")


@dataclass(frozen=True)
class Preprocessing:
    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "squash"  # no crop
    interpolation: str = "bilinear"
    channels: str = "RGB"
    dtype: str = "uint8"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"unusable preprocessing: size {self.size}, mean {self.mean}, std {self.std}")
        if (self.resize, self.interpolation, self.channels, self.dtype, self.layout) != (
                "squash", "bilinear", "RGB", "uint8", "NCHW"):
            raise ValueError(f"unsupported preprocessing {self.to_dict()}: this pipeline decodes to uint8 RGB NCHW, "
                             "squashed with bilinear resampling")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"preprocessing record has unknown key(s) {unknown}; known: {list(FIELDS)}")
        if "size" not in d:
            raise ValueError("preprocessing record has no 'size'")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        return cls.from_dict(json.loads(text))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def load(self, source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """A file (path or open binary file) -> the model input, uint8 (3, size, size). Raises ImageError."""
        return load_for_model(source, self.size, max_pixels)

    def describe(self) -> str:
        """The input contract in one line (model card, ONNX metadata)."""
        return (f"image: uint8 RGB NCHW (batch, 3, {self.size}, {self.size}), 0..255, EXIF-upright, squashed to "
                f"{self.size}x{self.size} with bilinear antialiasing (no crop); normalisation (mean {list(self.mean)}, "
                f"std {list(self.std)}) is in the graph. outputs: logits, probabilities (batch, classes)")
