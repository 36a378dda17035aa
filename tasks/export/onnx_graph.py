"""The checkpoint as an ONNX graph: uint8 images in, logits and probabilities out (and, for drift monitoring, the
pooled features as a third output, `embedding`), metadata inside."""

from __future__ import annotations

import logging
import math
import subprocess
import warnings

import numpy as np
import torch
from torch import nn

from tasks.inference import EMBEDDING, OUTPUTS
from tasks.preprocess import Preprocessing
from tasks.tensors import apply_variant, normalise
from tasks.tta import Averaged

DYNAMO_MIN_OPSET = 18  # the oldest opset torch's dynamo exporter writes (tasks/params/schema.py ExportParams)
log = logging.getLogger("tasks.export")


class ExportError(RuntimeError):
    """The exported model is not faithful to the checkpoint (or cannot be exported)."""


class Deployable(nn.Module):
    """uint8 RGB images in, (logits, probabilities) out: the training normalisation lives in the graph. With
    `embedding`, a third output: the pooled features before the classifier (`forward_head(..., pre_logits=True)`;
    under test-time augmentation, their mean over the views), what the server's drift monitoring tests. The first
    two outputs stay first, so consumers that read outputs by position (Triton configs, clients) are unchanged."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, embedding: bool = False):
        super().__init__()
        self.model = model
        self.mean, self.std = list(preprocessing.mean), list(preprocessing.std)
        self.embedding = embedding and has_embedding(model)
        self.output_names = OUTPUTS + ((EMBEDDING,) if self.embedding else ())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = normalise(image, self.mean, self.std)
        if not self.embedding:
            logits = self.model(x)
            return logits, logits.softmax(-1)
        logits, pooled = logits_and_embedding(self.model, x)
        return logits, logits.softmax(-1), pooled


def has_embedding(model: nn.Module) -> bool:
    """Whether the model exposes timm's interface for its pooled features (every backbone source here does)."""
    base = model.model if isinstance(model, Averaged) else model
    return hasattr(base, "forward_features") and hasattr(base, "forward_head")


def logits_and_embedding(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and pooled features from one pass of its trunk; for `Averaged` (test-time augmentation)
    the logits it computes (log of the mean probability over the views) and the mean of the views' features."""
    if not isinstance(model, Averaged):
        features = model.forward_features(x)
        return model.forward_head(features), model.forward_head(features, pre_logits=True)
    base, n = model.model, len(model.variants)
    if torch.onnx.is_in_onnx_export():  # one batch of all the views, as `Averaged` exports them
        views = [base.forward_features(torch.cat([apply_variant(x, v) for v in model.variants]))]
    else:  # one batch per view: faster in PyTorch on CPU (tasks/tta.py)
        views = [base.forward_features(apply_variant(x, v)) for v in model.variants]
    log_p = torch.cat([base.forward_head(f) for f in views]).log_softmax(-1).reshape(n, x.shape[0], -1)
    pooled = torch.cat([base.forward_head(f, pre_logits=True) for f in views]).reshape(n, x.shape[0], -1)
    return torch.logsumexp(log_p, 0) - math.log(n), pooled.mean(0)


def export_onnx(module: nn.Module, size: int, path, opset: int, exporter: str = "torchscript") -> str:
    """`module` as an ONNX graph at `path`: opset `opset`, dynamic batch, input `image`, outputs `logits` and
    `probabilities` (and `embedding` when the module has it: `module.output_names`). Returns the exporter used.

    `torchscript` is torch's classic tracing exporter: it writes any opset from 13, and on 2 CPU cores exports
    EfficientNet-Lite0 in ~4 s where the dynamo exporter takes 20-40 s (it decomposes the whole program first);
    upstream calls it legacy, so an architecture it cannot export falls back to dynamo (logged) when the opset
    allows. `ExportError` when the file written declares another opset than asked."""
    if exporter == "torchscript":
        try:
            _torchscript(module, size, path, opset)
        except torch.onnx.errors.OnnxExporterError as exc:
            if opset < DYNAMO_MIN_OPSET:
                raise ExportError(f"the torchscript exporter cannot export this model ({str(exc).splitlines()[0]}); "
                                  f"set export.exporter: dynamo with export.opset {DYNAMO_MIN_OPSET} or more") from None
            log.warning("export: the torchscript exporter cannot export this model (%s); using the dynamo exporter",
                        str(exc).splitlines()[0])
            exporter = "dynamo"
    if exporter == "dynamo":
        _dynamo(module, size, path, opset)
    written = onnx_opset(path)
    if written != opset:
        raise ExportError(f"export.opset: {opset} was asked for, but the {exporter} exporter wrote opset {written}")
    return exporter


def _output_names(module: nn.Module) -> list[str]:
    return list(getattr(module, "output_names", OUTPUTS))


def _torchscript(module: nn.Module, size: int, path, opset: int) -> None:
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    names = _output_names(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy": chosen for its speed, see export_onnx
        # the recorded preprocessing (mean, std) is traced as constants, as intended; the parity check guards the graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in ["image", *names]})


def _dynamo(module: nn.Module, size: int, path, opset: int) -> None:
    if opset < DYNAMO_MIN_OPSET:  # it would write 18 and log a converter traceback: refuse instead
        raise ExportError(f"export.opset: {opset} cannot be written by the dynamo exporter (opset "
                          f"{DYNAMO_MIN_OPSET} or later); set export.opset to {DYNAMO_MIN_OPSET} or more, or "
                          "export.exporter: torchscript")
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=opset, input_names=["image"],
        output_names=_output_names(module), optimize=True, verify=False,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    program.save(str(path))


def onnx_opset(path) -> int:
    """The default-domain (ai.onnx) opset a model file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


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


def update_metadata(path, updates: dict[str, str]) -> None:
    """Set some metadata entries of a file (the others kept), then check the model as `add_metadata` does."""
    import onnx

    current = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    add_metadata(path, {**current, **updates})


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
