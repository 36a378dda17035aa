"""Export stage: the evaluated checkpoint -> a self-describing `model.onnx`, verified.

Input contract of the exported model (also in its metadata):
- input `image`: uint8, shape (batch, 3, size, size), RGB, values 0..255, produced by
  `tasks.images.load_for_model` (EXIF-upright, converted to RGB, squashed to size x size,
  bilinear). Normalisation is folded into the graph, so clients feed raw pixels;
- outputs `logits` (batch, classes) and `probabilities` (softmax of the logits).

The file is written beside its destination, checked with `onnx.checker`, run with ONNX
Runtime on the whole test split and compared with PyTorch (max |logit diff| and top-1
agreement, tolerances from `export.*`); only then is it renamed into place, so a failed
export leaves the previous model untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from tasks.data import split_arrays
from tasks.io import atomic_path, read_json, sha256_file, write_json
from tasks.metrics import classification_metrics
from tasks.train import load_checkpoint

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported model is not faithful to the checkpoint (or cannot be exported)."""


class Deployable(nn.Module):
    """uint8 RGB images in, (logits, probabilities) out: normalisation lives in the graph."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image.float() * self.scale - self.shift)
        return logits, logits.softmax(-1)


def export_onnx(module: nn.Module, size: int, path: Path, opset: int) -> None:
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=opset, input_names=["image"],
        output_names=["logits", "probabilities"], optimize=True, verify=False,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    program.save(str(path))


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = "Fine-tuned classifier; see metadata 'input_contract'."
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(session, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    outs = [session.run(["logits"], {"image": images[i : i + batch_size].numpy()})[0]
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs)


def parity(torch_logits: np.ndarray, ort_logits: np.ndarray) -> dict:
    return {
        "max_abs_logit_diff": float(np.abs(torch_logits - ort_logits).max()) if len(ort_logits) else 0.0,
        "top1_agreement": float((torch_logits.argmax(1) == ort_logits.argmax(1)).mean()) if len(ort_logits) else 1.0,
        "n": int(len(ort_logits)),
    }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(checkpoint_path: Path, manifest_path: Path, images_dir: Path, verdict_path: Path, metrics_path: Path,
        params_path: Path, onnx_path: Path, report_path: Path, opset: int, max_abs_diff: float,
        min_top1_agreement: float, workers: int = 4) -> dict:
    t0 = time.time()
    verdict = read_json(verdict_path)
    if not verdict.get("passed"):
        raise ExportError(f"{verdict_path}: the gate did not pass ({verdict.get('reason')}); nothing is exported")
    model, ckpt = load_checkpoint(checkpoint_path)
    classes, pre = ckpt["classes"], ckpt["preprocessing"]
    module = Deployable(model, pre["mean"], pre["std"]).eval()
    metrics = read_json(metrics_path)
    metadata = {
        "classes": json.dumps(classes),
        "preprocessing": json.dumps(pre),
        "input_contract": (f"image: uint8 RGB NCHW (batch, 3, {pre['size']}, {pre['size']}), 0..255, squashed to "
                           f"{pre['size']}x{pre['size']} bilinear; normalisation is in the graph. "
                           "outputs: logits, probabilities (batch, classes)"),
        "arch": ckpt["base"]["arch"],
        "weights_origin": json.dumps({k: ckpt["base"][k] for k in ("source", "weights", "sha256")}),
        "data_version": sha256_file(manifest_path),
        "params_sha256": hashlib.sha256(Path(params_path).read_bytes()).hexdigest() if Path(params_path).exists() else "",
        "git_commit": git_commit(),
        "metrics": json.dumps({k: metrics[k] for k in ("accuracy", "macro_recall", "macro_f1", "n")}),
        "gate_verdict": json.dumps({"passed": verdict["passed"], "reason": verdict["reason"]}),
    }
    manifest = pd.read_csv(manifest_path, keep_default_na=False)
    images, labels = split_arrays(manifest, images_dir, "test", classes, pre["size"], workers)
    with torch.no_grad():
        torch_logits = torch.cat([module(images[i : i + 32])[0] for i in range(0, len(images), 32)]).numpy() \
            if len(images) else np.zeros((0, len(classes)), np.float32)
    with atomic_path(onnx_path) as tmp:
        export_onnx(module, pre["size"], tmp, opset)
        add_metadata(tmp, metadata)
        ort_logits = run_ort(ort_session(tmp), images)
        check = parity(torch_logits, ort_logits)
        onnx_metrics = classification_metrics(labels.numpy(), ort_logits.argmax(1), classes)
        check.update({"onnx_accuracy": onnx_metrics["accuracy"], "onnx_macro_recall": onnx_metrics["macro_recall"],
                      "onnx_macro_f1": onnx_metrics["macro_f1"], "max_abs_diff_bound": max_abs_diff,
                      "min_top1_agreement": min_top1_agreement})
        check["passed"] = check["max_abs_logit_diff"] <= max_abs_diff and check["top1_agreement"] >= min_top1_agreement
        if not check["passed"]:
            write_json(report_path, check)
            raise ExportError(
                f"ONNX parity failed on {check['n']} test images: max |logit diff| {check['max_abs_logit_diff']:.2e} "
                f"(bound {max_abs_diff:.0e}), top-1 agreement {check['top1_agreement']:.4f} (bound {min_top1_agreement})"
            )
    check.update({"onnx_path": str(onnx_path), "bytes": onnx_path.stat().st_size, "sha256": sha256_file(onnx_path),
                  "opset": opset, "seconds": round(time.time() - t0, 2)})
    write_json(report_path, check)
    log.info("export: %s verified on %d test images (max |diff| %.2e, top-1 agreement %.4f, ONNX accuracy %.4f)",
             onnx_path, check["n"], check["max_abs_logit_diff"], check["top1_agreement"], check["onnx_accuracy"])
    return check
