"""The checkpoint as an ONNX graph: uint8 images in, logits and probabilities out, metadata inside."""

from __future__ import annotations

import subprocess

import numpy as np
import torch
from torch import nn

from tasks.preprocess import Preprocessing
from tasks.tensors import normalise


class Deployable(nn.Module):
    """uint8 RGB images in, (logits, probabilities) out: the training normalisation lives in the graph."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model = model
        self.mean, self.std = list(preprocessing.mean), list(preprocessing.std)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(normalise(image, self.mean, self.std))
        return logits, logits.softmax(-1)


def export_onnx(module: nn.Module, size: int, path, opset: int) -> None:
    """The dynamo exporter, opset `opset`, dynamic batch, input `image`, outputs `logits`, `probabilities`."""
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=opset, input_names=["image"],
        output_names=["logits", "probabilities"], optimize=True, verify=False,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    program.save(str(path))


def add_metadata(path, metadata: dict[str, str]) -> None:
    """Replace the file's metadata and check the model (full check)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = "Fine-tuned classifier; see metadata 'input_contract'."
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def parity(torch_out: np.ndarray, ort_out: np.ndarray) -> dict:
    return {
        "max_abs_logit_diff": float(np.abs(torch_out - ort_out).max()) if len(ort_out) else 0.0,
        "top1_agreement": float((torch_out.argmax(1) == ort_out.argmax(1)).mean()) if len(ort_out) else 1.0,
        "n": len(ort_out),
    }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
