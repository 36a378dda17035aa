"""Export stage: the evaluated checkpoint -> a self-describing `model.onnx`, verified.

The exported model takes uint8 images (batch, 3, size, size) and outputs `logits` and
`probabilities`; normalisation is in the graph, and the metadata carries `classes`,
`preprocessing` (the `tasks.preprocess.Preprocessing` record), the input contract and the lineage
(weights origin, data version, params hash, git commit, metrics, verdict). The file is written
beside its destination, checked with `onnx.checker`, run with ONNX Runtime through the inference
module on the whole test split (decoded batch by batch, never held at once: docs/scale.md) and
compared with PyTorch (max |logit diff| and top-1 agreement, tolerances from `export.*`); only then
is it renamed into place, so a failed export leaves the previous model untouched. Optionally an INT8
model (`tasks/export/int8.py`) and always a model card (`tasks/export/model_card.md.j2`). The model's third output,
`embedding` (pooled features), and the drift reference beside the model (`drift_reference.npz`, named in the
metadata: `tasks/export/reference.py`) are what the model server's drift monitoring compares traffic with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.checkpoint import Checkpoint, load_checkpoint
from tasks.drift import INT8_REFERENCE_FILE, REFERENCE_FILE
from tasks.entry import stage_main
from tasks.export import reference as drift_reference
from tasks.export.card import data_summary, render
from tasks.export.int8 import INT8_FILE, ExportError, int8_candidate
from tasks.export.onnx_graph import (
    Deployable,
    add_metadata,
    export_onnx,
    git_commit,
    onnx_opset,
    parity,
)
from tasks.files import atomic_path, atomic_write, read_json, sha256_file, write_json
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.inference import OnnxClassifier
from tasks.manifest import read_manifest
from tasks.metrics import classification_metrics
from tasks.params import DriftParams, Params
from tasks.sources import SOURCES
from tasks.tensors import DecodedOnDemand, Images, batches, split_labels
from tasks.tta import with_tta

log = logging.getLogger("tasks.export")


def parity_logits(module: nn.Module, onnx_path, images: Images, n_classes: int,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(PyTorch logits, ONNX Runtime logits) of the same uint8 images, in one pass of `batch_size` batches.

    Each batch is taken once (`images` may be `DecodedOnDemand`: then it is decoded once, and memory holds one
    batch of images plus the logits, never the split) and given to both: `module` (`Deployable`) and the ONNX
    file through the inference module. The batches are those of running each on the whole decoded tensor, so
    the logits are the same numbers."""
    classifier = OnnxClassifier(onnx_path, batch_size=batch_size)
    reference, onnx_out = [], []
    with torch.no_grad():
        for batch in batches(images, batch_size):
            reference.append(module(batch)[0].numpy())
            onnx_out.append(classifier.run(batch.numpy())[0])
    if not reference:
        return np.zeros((0, n_classes), np.float32), np.zeros((0, n_classes), np.float32)
    return np.concatenate(reference), np.concatenate(onnx_out)


def run(checkpoint_path: Path, manifest_path: Path, images_dir: Path, verdict_path: Path, metrics_path: Path,
        onnx_path: Path, report_path: Path, opset: int, max_abs_diff: float,
        min_top1_agreement: float, workers: int = 4, *, exporter: str = "torchscript", int8: bool = False, int8_max_accuracy_drop: float = 0.01,
        int8_calibration_images: int = 256, int8_dir: Path | None = None, model_card_path: Path | None = None,
        data_description: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, tta: str = "none",
        drift: DriftParams | None = None) -> dict:
    """Gate check, fp32 export + parity, optional INT8, model card, report.

    `int8_dir` (default: `<onnx dir>/int8`) ends up holding `model.int8.onnx` of this model when
    INT8 is enabled and kept, and nothing otherwise; `model_card_path` defaults to
    `<onnx dir>/model_card.md`. The drift reference (`drift`: its params) is written beside the model.
    """
    t0 = time.time()
    onnx_path = Path(onnx_path)
    int8_dir = Path(int8_dir) if int8_dir is not None else onnx_path.parent / "int8"
    model_card_path = Path(model_card_path) if model_card_path is not None else onnx_path.parent / "model_card.md"
    verdict, checkpoint_sha256 = passed_verdict(verdict_path, checkpoint_path)
    model, ckpt = load_checkpoint(checkpoint_path)
    classes, pre = ckpt.classes, ckpt.preprocessing
    module = Deployable(with_tta(model, tta), pre, embedding=True).eval()  # test-time augmentation lives in the graph
    drift = drift or DriftParams()
    metrics = read_json(metrics_path)
    metadata = export_metadata(ckpt, tta, manifest_path, checkpoint_sha256, verdict, metrics)
    manifest = read_manifest(manifest_path)
    test = manifest[manifest["split"] == "test"]
    # decoded batch by batch when a pass reaches them (parity here, INT8 scoring later): never the whole split
    images = DecodedOnDemand([Path(images_dir) / p for p in test["path"]], pre.size, workers, max_pixels)
    labels = split_labels(manifest, "test", classes)
    int8_tmp: Path | None = None
    int8_report: dict = {"enabled": int8, "status": "disabled"}
    try:
        with atomic_path(onnx_path) as tmp:
            check, ort_logits = export_with_parity(module, pre.size, tmp, opset, exporter, metadata, images, labels,
                                                   classes, max_abs_diff, min_top1_agreement, report_path)
            ref, ref_images, check["drift_reference"] = drift_reference.record(
                tmp, onnx_path.parent / REFERENCE_FILE, manifest, images_dir, pre.size, workers, max_pixels,
                drift.components, drift.fit_images, drift.reference_images)
            if int8:
                int8_tmp, int8_report = int8_candidate(
                    tmp, int8_dir, metadata, manifest, images_dir, classes, pre.size, workers, images, labels,
                    ort_logits, check["onnx_accuracy"], int8_max_accuracy_drop, int8_calibration_images, max_pixels)
                if int8_tmp is not None:
                    int8_report["drift_reference"] = drift_reference.record_int8(
                        int8_tmp, ref, ref_images, int8_dir / INT8_REFERENCE_FILE)
        # the fp32 model is in place; now the INT8 directory holds this model's INT8 file or nothing
        place_int8(int8_tmp, int8_dir, int8_report)
        int8_tmp = None
    finally:
        if int8_tmp is not None and int8_tmp.exists():
            int8_tmp.unlink()
    check.update({"onnx_path": str(onnx_path), "bytes": onnx_path.stat().st_size, "sha256": sha256_file(onnx_path),
                  "opset": onnx_opset(onnx_path),  # what the file declares (export_onnx checked it is `opset`)
                  "int8": int8_report, "model_card": str(model_card_path),
                  "seconds": round(time.time() - t0, 2)})
    atomic_write(model_card_path, render(metadata, ckpt, metrics, verdict, check, int8_report,
                                         data_summary(manifest), data_description))
    write_json(report_path, check)
    log.info("export: %s verified on %d test images (max |diff| %.2e, top-1 agreement %.4f, ONNX accuracy %.4f); "
             "INT8 %s", onnx_path, check["n"], check["max_abs_logit_diff"], check["top1_agreement"],
             check["onnx_accuracy"], int8_report["status"])
    return check


def passed_verdict(verdict_path: Path, checkpoint_path: Path) -> tuple[dict, str]:
    """The gate's verdict and the checkpoint's sha256, when the verdict passed this very checkpoint; else
    `ExportError` (nothing is exported)."""
    verdict = read_json(verdict_path)
    if not verdict.get("passed"):
        raise ExportError(f"{verdict_path}: the gate did not pass ({verdict.get('reason')}); nothing is exported")
    checkpoint_sha256 = sha256_file(checkpoint_path)
    judged = (verdict.get("candidate") or {}).get("checkpoint_sha256")
    if judged != checkpoint_sha256:
        raise ExportError(f"{verdict_path} judged checkpoint {str(judged)[:12]}..., but {checkpoint_path} is "
                          f"{checkpoint_sha256[:12]}...: a stale verdict; run the gate again (dvc repro)")
    return verdict, checkpoint_sha256


def export_metadata(ckpt: Checkpoint, tta: str, manifest_path: Path, checkpoint_sha256: str, verdict: dict,
                  metrics: dict) -> dict[str, str]:
    """What the ONNX file says about itself: classes, preprocessing and input contract, and the lineage."""
    pre = ckpt.preprocessing
    return {
        "classes": json.dumps(ckpt.classes),
        "preprocessing": pre.to_json(),
        "input_contract": pre.describe(),
        "tta": tta,
        "arch": ckpt.base["arch"],
        "weights_origin": json.dumps({k: ckpt.base.get(k) for k in ("source", "weights", "sha256")}),
        "data_version": sha256_file(manifest_path),
        # the params that produced the weights (training config and seed, as the checkpoint records them)
        "params_sha256": hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode()).hexdigest(),
        "candidate": json.dumps({"checkpoint_sha256": checkpoint_sha256,
                                 "predictions_sha256": verdict["candidate"].get("predictions_sha256")}),
        "git_commit": git_commit(),
        "metrics": json.dumps({k: metrics[k] for k in ("accuracy", "macro_recall", "macro_f1", "n")}),
        "gate_verdict": json.dumps({"passed": verdict["passed"], "reason": verdict["reason"]}),
    }


def export_with_parity(module: nn.Module, size: int, tmp: Path, opset: int, exporter: str, metadata: dict[str, str],
                       images: Images, labels: torch.Tensor, classes: list[str], max_abs_diff: float,
                       min_top1_agreement: float, report_path: Path) -> tuple[dict, np.ndarray]:
    """Export `module` to `tmp` with its metadata and compare ONNX Runtime with PyTorch on the test images:
    (the parity check, ONNX Runtime's logits); `ExportError` (report written) when outside the tolerances."""
    used = export_onnx(module, size, tmp, opset, exporter)
    add_metadata(tmp, metadata)
    reference, ort_logits = parity_logits(module, tmp, images, len(classes))
    check = parity(reference, ort_logits)
    onnx_metrics = classification_metrics(labels.numpy(), ort_logits.argmax(1), classes)
    check.update({"exporter": used, "onnx_accuracy": onnx_metrics["accuracy"], "onnx_macro_recall": onnx_metrics["macro_recall"],
                  "onnx_macro_f1": onnx_metrics["macro_f1"], "max_abs_diff_bound": max_abs_diff,
                  "min_top1_agreement": min_top1_agreement})
    check["passed"] = check["max_abs_logit_diff"] <= max_abs_diff and check["top1_agreement"] >= min_top1_agreement
    if not check["passed"]:
        write_json(report_path, check)
        raise ExportError(
            f"ONNX parity failed on {check['n']} test images: max |logit diff| {check['max_abs_logit_diff']:.2e} "
            f"(bound {max_abs_diff:.0e}), top-1 agreement {check['top1_agreement']:.4f} (bound {min_top1_agreement})"
        )
    return check, ort_logits


def place_int8(int8_tmp: Path | None, int8_dir: Path, int8_report: dict) -> None:
    """Put the kept INT8 model (`int8_tmp`) in `int8_dir`, its path, size and sha256 into `int8_report`; without
    one, remove a previous model's INT8 file and its drift reference: they must not ship beside this model."""
    int8_path = int8_dir / INT8_FILE
    int8_dir.mkdir(parents=True, exist_ok=True)
    if int8_tmp is not None:
        os.replace(int8_tmp, int8_path)
        int8_report.update({"path": str(int8_path), "bytes": int8_path.stat().st_size,
                            "sha256": sha256_file(int8_path)})
        return
    for stale in (int8_path, int8_dir / INT8_REFERENCE_FILE):
        if stale.exists():
            stale.unlink()


def main(argv: list[str] | None = None) -> None:
    stage_main("export", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    e, d = p.export, p.data
    source = f"{d.source}" + (f" ({d.path})" if d.path else "") + (f", task {d.task}" if SOURCES[d.source].probabilities else "")
    run(args.checkpoint, args.manifest, args.images, args.verdict, args.metrics, args.onnx_path,
        args.report, e.opset, e.max_abs_diff, e.min_top1_agreement, workers=d.workers, exporter=e.exporter, int8=e.int8,
        int8_max_accuracy_drop=e.int8_max_accuracy_drop, int8_calibration_images=e.int8_calibration_images,
        int8_dir=args.int8_dir, model_card_path=args.model_card, data_description=source, max_pixels=d.max_pixels,
        tta=e.tta, drift=p.drift)
