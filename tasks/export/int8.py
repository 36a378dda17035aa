"""Optional INT8 model: ONNX Runtime static quantization of the verified fp32 file, calibrated on the
validation split (never the test split), kept only when its test accuracy stays within
`export.int8_max_accuracy_drop` of the fp32 ONNX model's.

Images are decoded batch by batch as ONNX Runtime asks for them (`DecodedOnDemand`): the test split for
scoring, and for calibration only the `export.int8_calibration_images` rows it uses (a capped sample:
ONNX Runtime's MinMax calibrator keeps every calibration batch's activations until the end, so the cap,
not the decoding, bounds calibration's memory)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from onnxruntime.quantization import CalibrationDataReader

from tasks.export.onnx_graph import ExportError, add_metadata, parity
from tasks.files import new_temp, sha256_file
from tasks.inference import session
from tasks.metrics import classification_metrics
from tasks.tensors import DecodedOnDemand, Images, batches

log = logging.getLogger("tasks.export")



# Op types quantized to INT8. On x86 CPUs ONNX Runtime fuses DequantizeLinear -> op ->
# QuantizeLinear into integer kernels (u8 activations x s8 weights, VNNI/AVX2): QLinearConv,
# QLinearMatMul, QLinearAdd; a Clip/Relu right after a quantized op is folded into that op's
# output range and disappears; MaxPool/GlobalAveragePool pass int8 through, so the chain stays
# quantized. Left in fp32 on purpose: the stem (the first Conv, which sees the normalised image:
# in a trial on ELPV at 224 px quantizing it cost most of the fp32/int8 top-1 agreement, for ~3%
# of the multiply-adds), the classifier (Gemm: tiny, and its logits are what is compared), and
# ReduceMean/Softmax (no integer kernels on CPU). Mul is left out: here it is the folded
# normalisation, which gains nothing.
INT8_OP_TYPES = ("Conv", "MatMul", "Add", "Clip", "Relu", "MaxPool", "GlobalAveragePool")
INT8_FILE = "model.int8.onnx"


class UInt8Batches(CalibrationDataReader):
    """Calibration data for ONNX Runtime: uint8 images (N, 3, S, S) fed to the `image` input in batches, each
    taken (on `DecodedOnDemand`: decoded) when ONNX Runtime asks for it."""

    def __init__(self, images: Images, batch_size: int = 16):
        self._batches = (batch.numpy() for batch in batches(images, batch_size))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def evenly_spaced(n: int, cap: int) -> np.ndarray:
    """Indices of at most `cap` of `n` items, evenly spaced (deterministic, covers the whole list)."""
    return np.unique(np.linspace(0, n - 1, min(cap, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def quantize_int8(fp32_path: Path, out_path: Path, calibration: Images, batch_size: int = 16) -> dict:
    """Static INT8 quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges
    calibrated on `calibration`) of the fp32 ONNX file; returns the recipe (for the metadata)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("INT8 calibration needs images, and the calibration split is empty; "
                          "set data.split.val > 0 or export.int8=false")
    with tempfile.TemporaryDirectory(prefix="finetune-int8-") as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))  # shape inference + graph cleanup, as ORT recommends
        nodes = onnx.load(str(pre), load_external_data=False).graph.node
        stem = [n.name for n in nodes if n.op_type == "Conv"][:1]
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per rescaled bias on the root logger
        try:
            quantize_static(
                str(pre), str(out_path), UInt8Batches(calibration, batch_size), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=stem, per_channel=True,
                reduce_range=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
            )
        finally:
            root.setLevel(level)
    return {
        "tool": f"onnxruntime {ort.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, per output channel, symmetric",
        "activations": "uint8, per tensor, MinMax calibration",
        "op_types": list(INT8_OP_TYPES),
        "quantized_ops": quantized_op_counts(out_path),
        "kept_fp32": {"stem": stem, "also": "classifier (Gemm), ReduceMean, Softmax, input normalisation"},
        "calibration_images": len(calibration),
    }


def quantized_op_counts(path: Path) -> dict[str, str]:
    """'quantized/total' per op type; an op counts as quantized when it sits between DequantizeLinear
    and QuantizeLinear nodes (the pattern ONNX Runtime turns into an integer kernel)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    from_dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    to_q = {n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    counts: dict[str, list[int]] = {}
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        c = counts.setdefault(n.op_type, [0, 0])
        c[0] += any(i in from_dq for i in n.input) and any(o in to_q for o in n.output)
        c[1] += 1
    return {op: f"{q}/{t}" for op, (q, t) in sorted(counts.items())}


def score_onnx(path: Path, images: Images, labels: torch.Tensor, classes: list[str],
               reference_logits: np.ndarray) -> dict:
    """Test-split metrics of an ONNX model and its agreement with `reference_logits`."""
    logits = run_logits(path, images)
    m = classification_metrics(labels.numpy(), logits.argmax(1), classes)
    agreement = parity(reference_logits, logits)
    return {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "macro_f1": m["macro_f1"], "n": m["n"],
            "top1_agreement_vs_fp32": agreement["top1_agreement"],
            "max_abs_logit_diff_vs_fp32": agreement["max_abs_logit_diff"]}


def run_logits(path: Path, images: Images, batch_size: int = 32) -> np.ndarray:
    """Logits of any ONNX file with this pipeline's input/outputs (metadata not needed), batch by batch."""
    sess = session(path)
    outs = [sess.run(["logits"], {"image": batch.numpy()})[0] for batch in batches(images, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def int8_decision(fp32_accuracy: float, int8_accuracy: float, max_drop: float) -> tuple[bool, float]:
    """Keep the INT8 model when its test accuracy is at most `max_drop` below the fp32 ONNX model's."""
    drop = fp32_accuracy - int8_accuracy
    return drop <= max_drop + 1e-9, drop


def int8_candidate(fp32_path: Path, int8_dir: Path, metadata: dict, manifest: pd.DataFrame, images_dir: Path,
                    classes: list[str], size: int, workers: int, test_images: Images, test_labels: torch.Tensor,
                    fp32_logits: np.ndarray, fp32_accuracy: float, max_drop: float,
                    max_images: int, max_pixels: int) -> tuple[Path | None, dict]:
    """Quantize the verified fp32 file into a temp file in `int8_dir`, score it on the test split and
    decide. Returns (temp path when kept, else None; the report entry)."""
    t0 = time.time()
    split = "val" if (manifest["split"] == "val").any() else "train"
    if split != "val":
        log.warning("export: no validation images; INT8 calibration uses the training split")
    calib_rows = manifest[manifest["split"] == split]
    calib_rows = calib_rows.iloc[evenly_spaced(len(calib_rows), max_images)]
    # only the sampled rows, decoded a calibration batch at a time as ONNX Runtime reads them
    calibration = DecodedOnDemand([Path(images_dir) / p for p in calib_rows["path"]], size, workers, max_pixels)
    int8_dir.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(int8_dir / INT8_FILE)
    try:
        try:
            recipe = quantize_int8(fp32_path, tmp, calibration)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"INT8 quantization failed ({type(exc).__name__}: {exc}); the fp32 export was not "
                              "replaced. Set export.int8=false to export the fp32 model alone") from exc
        recipe["calibration_split"] = split
        scores = score_onnx(tmp, test_images, test_labels, classes, fp32_logits)
        kept, drop = int8_decision(fp32_accuracy, scores["accuracy"], max_drop)
        report = {"enabled": True, "status": "kept" if kept else "dropped", **scores, "fp32_accuracy": fp32_accuracy,
                  "accuracy_drop": drop, "max_accuracy_drop": max_drop, "calibration_images": len(calibration),
                  "calibration_split": split, "recipe": recipe, "seconds": round(time.time() - t0, 2)}
        if kept:
            quantization = {**recipe, "fp32_sha256": sha256_file(fp32_path),
                            "test": {k: scores[k] for k in ("accuracy", "macro_recall", "macro_f1", "n",
                                                            "top1_agreement_vs_fp32")},
                            "fp32_test_accuracy": fp32_accuracy, "accuracy_drop": drop, "max_accuracy_drop": max_drop}
            add_metadata(tmp, {**metadata, "quantization": json.dumps(quantization)})
            os.chmod(tmp, 0o644)
            log.info("export: INT8 kept: test accuracy %.4f vs fp32 %.4f (drop %.4f <= %.4f)",
                     scores["accuracy"], fp32_accuracy, drop, max_drop)
            return tmp, report
        log.warning("export: INT8 dropped: test accuracy %.4f vs fp32 %.4f (drop %.4f > %.4f)",
                    scores["accuracy"], fp32_accuracy, drop, max_drop)
        tmp.unlink()
        return None, report
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
