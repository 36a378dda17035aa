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

Optional INT8 (`export.int8`): ONNX Runtime static quantization of the verified fp32 file,
calibrated on the validation split (never the test split), QDQ format, int8 per-channel
weights and uint8 activations. It is scored on the test split exactly like the fp32 file and
kept, as `<int8_dir>/model.int8.onnx` with the same metadata plus a `quantization` entry,
only when its accuracy drop against the fp32 ONNX model is within
`export.int8_max_accuracy_drop`. `<int8_dir>` always exists and holds the INT8 model of the
current fp32 model or nothing, so DVC can declare it as an output either way.

A Markdown model card (`model_card.md`) is written beside the model: intended use, data,
training recipe, metrics, gate verdict, parity, the INT8 outcome, the input contract, limits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from tasks.data import split_arrays
from tasks.ingest import read_manifest
from tasks.io import atomic_path, atomic_write, read_json, sha256_file, write_json
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
        "n": len(ort_logits),
    }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- INT8 ---------------------------------------------------------------------------------

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
    """Calibration data for ONNX Runtime: uint8 images (N, 3, S, S) fed to the `image` input in batches."""

    def __init__(self, images: torch.Tensor, batch_size: int = 16):
        self._batches = iter([images[i : i + batch_size].numpy() for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def evenly_spaced(n: int, cap: int) -> np.ndarray:
    """Indices of at most `cap` of `n` items, evenly spaced (deterministic, covers the whole list)."""
    return np.unique(np.linspace(0, n - 1, min(cap, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def quantize_int8(fp32_path: Path, out_path: Path, calibration: torch.Tensor, batch_size: int = 16) -> dict:
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


def score_onnx(session, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
               reference_logits: np.ndarray) -> dict:
    """Test-split metrics of an ONNX model and its agreement with `reference_logits`."""
    logits = run_ort(session, images)
    m = classification_metrics(labels.numpy(), logits.argmax(1), classes)
    agreement = parity(reference_logits, logits)
    return {"accuracy": m["accuracy"], "macro_recall": m["macro_recall"], "macro_f1": m["macro_f1"], "n": m["n"],
            "top1_agreement_vs_fp32": agreement["top1_agreement"],
            "max_abs_logit_diff_vs_fp32": agreement["max_abs_logit_diff"]}


def int8_decision(fp32_accuracy: float, int8_accuracy: float, max_drop: float) -> tuple[bool, float]:
    """Keep the INT8 model when its test accuracy is at most `max_drop` below the fp32 ONNX model's."""
    drop = fp32_accuracy - int8_accuracy
    return drop <= max_drop + 1e-9, drop


# ---- model card ---------------------------------------------------------------------------


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ci(metrics: dict, name: str) -> str:
    """The confidence interval of a metric, if the metrics carry one (`ci: {name: [lo, hi]}`,
    `ci: {name: {low, high}}` or `<name>_ci: [lo, hi]`)."""
    ci = (metrics.get("ci") or {}).get(name) if isinstance(metrics.get("ci"), dict) else None
    ci = ci if ci is not None else metrics.get(f"{name}_ci")
    if isinstance(ci, dict):
        ci = [ci.get("low", ci.get("lo")), ci.get("high", ci.get("hi"))]
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return f"{_pct(ci[0])} – {_pct(ci[1])}"
    return ""


def model_card(metadata: dict[str, str], ckpt: dict, metrics: dict, verdict: dict, check: dict, int8: dict,
               data_summary: dict, data_description: str | None = None) -> str:
    """The model card (Markdown) of an export: everything in it comes from the artifacts."""
    classes, pre, base = ckpt["classes"], ckpt["preprocessing"], ckpt["base"]
    config, best = ckpt.get("config") or {}, ckpt.get("best") or {}
    train_cfg = config.get("train") or {}
    weights = json.loads(metadata.get("weights_origin") or "{}")
    out: list[str] = []

    def para(*parts: str) -> None:  # one paragraph from pieces, then a blank line
        out.extend(["".join(parts), ""])

    out += [f"# Model card: {base.get('arch', '?')} fine-tuned for {len(classes)} classes", ""]
    para(f"`{Path(check.get('onnx_path', 'model.onnx')).name}` (sha256 `{check.get('sha256', '?')}`, ",
         f"{check.get('bytes', 0) / 1e6:.1f} MB, opset {check.get('opset', '?')}); git commit ",
         f"`{metadata.get('git_commit', 'unknown')}`; params sha256 `{metadata.get('params_sha256', '')[:16]}`.")

    out += ["## Intended use", ""]
    para(f"Image classification into {', '.join(f'`{c}`' for c in classes)}, for images like the training data ",
         "(same kind of camera, framing and preprocessing). Use it to sort or screen images and send uncertain or ",
         "consequential cases to a person; it was not evaluated for any other use. Feed it images through the input ",
         "contract below: the `probabilities` output is a softmax score, not a calibrated probability.")

    out += ["## Data", ""]
    if data_description:
        para(f"Source: {data_description}.")
    para(f"Data version (sha256 of the validated manifest): `{metadata.get('data_version', '?')}`.")
    out += ["| split | " + " | ".join(classes) + " | total |", "| --- |" + " --- |" * (len(classes) + 1)]
    for split in ("train", "val", "test"):
        row = data_summary.get(split, {})
        out.append(f"| {split} | " + " | ".join(str(row.get(c, 0)) for c in classes) + f" | {sum(row.values())} |")
    out.append("")
    para("Checkpoint selection used the validation split only; the test split was never seen in training.")

    out += ["## Training recipe", "",
            (f"- Backbone: `{base.get('arch')}`, pretrained weights `{weights.get('weights')}` from "
             f"`{weights.get('source')}` (sha256 `{str(weights.get('sha256'))[:16]}…`)."),
            (f"- Input size {pre['size']} px ({pre.get('resize', 'squash')}, {pre.get('interpolation', 'bilinear')}), "
             f"mean {list(pre['mean'])}, std {list(pre['std'])}.")]
    if train_cfg:
        para(f"- Seed {config.get('seed')}, batch size {train_cfg.get('batch_size')}, augmentation ",
             f"{train_cfg.get('augment') or 'none'}, class imbalance handling {train_cfg.get('imbalance')}, label ",
             f"smoothing {train_cfg.get('label_smoothing')}, gradient clip {train_cfg.get('grad_clip')}, checkpoint ",
             f"selected by validation {train_cfg.get('select_metric')}.")
        out += ["| stage | epochs | trainable | lr | backbone lr x | weight decay | warmup epochs | BatchNorm |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {st.get('name')} | {st.get('epochs')} | {st.get('trainable')} | {st.get('lr')} | "
                f"{st.get('backbone_lr_mult')} | {st.get('weight_decay')} | {st.get('warmup_epochs')} | {st.get('bn')} |"
                for st in train_cfg.get("stages", [])]
        out.append("")
    else:
        out += ["- (the checkpoint carries no training config)", ""]
    if best:
        para(f"Best checkpoint: stage `{best.get('stage')}`, epoch {best.get('epoch')}, validation ",
             f"{best.get('metric')} {best.get('score', float('nan')):.4f}.")

    out += ["## Metrics (test split)", "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    out += [f"| {name} | {_pct(metrics.get(name))} | {_ci(metrics, name) or 'n/a'} |"
            for name in ("accuracy", "macro_recall", "macro_f1")]
    out.append("")
    para(f"n = {metrics.get('n')} test images (PyTorch checkpoint, evaluate stage).")
    per_class = metrics.get("per_class") or {}
    if per_class:
        out += ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        out += [f"| {c} | {_pct(v.get('precision'))} | {_pct(v.get('recall'))} | {_pct(v.get('f1'))} | "
                f"{v.get('support')} |" for c, v in per_class.items()]
        out.append("")

    out += ["## Gate verdict", ""]
    para(f"**{'PASSED' if verdict.get('passed') else 'FAILED'}**: {verdict.get('reason')}")
    gates = verdict.get("gates") or []
    if gates:
        out += ["| gate | value | bound | result |", "| --- | --- | --- | --- |"]
        for g in gates:
            if g.get("bound") is None:
                continue  # gates switched off
            op = "<=" if g.get("direction") == "lower" else ">="
            value = "n/a" if g.get("value") is None else f"{g['value']:.4f}"
            out.append(f"| {g.get('name', g.get('metric'))} | {value} | {op} {g['bound']:.4f} | "
                       f"{'pass' if g.get('passed') else 'FAIL'} |")
        out.append("")
    champion = verdict.get("champion") or {}
    if champion.get("reason"):
        para(f"Against the champion: {champion['reason']}.")

    out += ["## Export verification (ONNX Runtime vs PyTorch, test split)", "",
            f"- max |logit difference|: {check['max_abs_logit_diff']:.2e} (bound {check['max_abs_diff_bound']:.0e})",
            f"- top-1 agreement: {check['top1_agreement']:.4f} (bound {check['min_top1_agreement']})",
            (f"- ONNX accuracy {_pct(check['onnx_accuracy'])}, macro recall {_pct(check['onnx_macro_recall'])}, "
             f"macro F1 {_pct(check['onnx_macro_f1'])} on {check['n']} images"), ""]

    out += ["## INT8 model", ""]
    status = int8.get("status")
    if status == "disabled":
        para("Not produced (`export.int8: false`).")
    else:
        recipe = int8.get("recipe") or {}
        ops = ", ".join(f"{op} {n}" for op, n in (recipe.get("quantized_ops") or {}).items()
                        if op in INT8_OP_TYPES or not n.startswith("0/"))
        verb = {"kept": "Kept", "dropped": "**Dropped**"}.get(status, status)
        para(f"{verb}: INT8 test accuracy {_pct(int8.get('accuracy'))} vs fp32 ONNX {_pct(int8.get('fp32_accuracy'))} ",
             f"(drop {100 * int8.get('accuracy_drop', 0):.2f} pt, allowed {100 * int8.get('max_accuracy_drop', 0):.2f} ",
             f"pt); macro F1 {_pct(int8.get('macro_f1'))}; top-1 agreement with fp32 ",
             f"{int8.get('top1_agreement_vs_fp32', 0):.4f}.")
        para(f"Static quantization ({recipe.get('format')}; weights {recipe.get('weights')}; activations ",
             f"{recipe.get('activations')}) calibrated on {int8.get('calibration_images')} ",
             f"{int8.get('calibration_split')} images; INT8 ops (quantized/total): {ops or 'n/a'}.")
        if status == "kept":
            para(f"File: `{int8.get('path')}` (sha256 `{int8.get('sha256')}`, {int8.get('bytes', 0) / 1e6:.1f} MB), ",
                 "same input contract and metadata plus a `quantization` entry.")

    out += ["## Input contract", ""]
    para(metadata.get("input_contract", ""))
    para("A client needs only the file: the classes, preprocessing and this contract are in its metadata ",
         "(`classes`, `preprocessing`, `input_contract`). Decode with EXIF orientation, convert to RGB, resize ",
         f"to {pre['size']}x{pre['size']} (no crop), keep uint8 0..255, NCHW.")

    out += ["## Known limits", "",
            (f"- Evaluated on {metrics.get('n')} test images from the same source as the training data; expect lower "
             "accuracy on other cameras, cell types, resolutions or acquisition settings (distribution shift is not "
             "detected by the model)."),
            "- Scores are softmax outputs, not calibrated probabilities; choose any decision threshold on held-out data.",
            f"- Images are squashed to {pre['size']} px: very different aspect ratios or resolutions lose detail.",
            ("- Metrics carry sampling error (see the CIs where present); small per-class supports make per-class "
             "numbers noisy.")]
    if data_description and "elpv" in data_description.lower():
        out.append("- Trained on ELPV (CC BY-NC-SA 4.0): the model inherits the data's non-commercial, share-alike "
                   "terms. Cite Buerhop-Lutz et al. (EU PVSEC 2018) and Deitsch et al. (Solar Energy 2019).")
    out.append("")
    return "\n".join(out)


def data_summary(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    return {split: {str(k): int(v) for k, v in rows["label"].astype(str).value_counts().sort_index().items()}
            for split, rows in manifest.groupby("split")}


# ---- the stage ----------------------------------------------------------------------------


def run(checkpoint_path: Path, manifest_path: Path, images_dir: Path, verdict_path: Path, metrics_path: Path,
        params_path: Path, onnx_path: Path, report_path: Path, opset: int, max_abs_diff: float,
        min_top1_agreement: float, workers: int = 4, *, int8: bool = False, int8_max_accuracy_drop: float = 0.01,
        int8_calibration_images: int = 256, int8_dir: Path | None = None, model_card_path: Path | None = None,
        data_description: str | None = None) -> dict:
    """The export stage: gate check, fp32 export + parity, optional INT8, model card, report.

    `int8_dir` (default: `<onnx dir>/int8`) ends up holding `model.int8.onnx` of this model when
    INT8 is enabled and kept, and nothing otherwise; `model_card_path` defaults to
    `<onnx dir>/model_card.md`.
    """
    t0 = time.time()
    onnx_path = Path(onnx_path)
    int8_dir = Path(int8_dir) if int8_dir is not None else onnx_path.parent / "int8"
    model_card_path = Path(model_card_path) if model_card_path is not None else onnx_path.parent / "model_card.md"
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
        "weights_origin": json.dumps({k: ckpt["base"].get(k) for k in ("source", "weights", "sha256")}),
        "data_version": sha256_file(manifest_path),
        "params_sha256": hashlib.sha256(Path(params_path).read_bytes()).hexdigest() if Path(params_path).exists() else "",
        "git_commit": git_commit(),
        "metrics": json.dumps({k: metrics[k] for k in ("accuracy", "macro_recall", "macro_f1", "n")}),
        "gate_verdict": json.dumps({"passed": verdict["passed"], "reason": verdict["reason"]}),
    }
    manifest = read_manifest(manifest_path)
    images, labels = split_arrays(manifest, images_dir, "test", classes, pre["size"], workers)
    with torch.no_grad():
        torch_logits = torch.cat([module(images[i : i + 32])[0] for i in range(0, len(images), 32)]).numpy() \
            if len(images) else np.zeros((0, len(classes)), np.float32)
    int8_tmp: Path | None = None
    int8_report: dict = {"enabled": int8, "status": "disabled"}
    try:
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
            if int8:
                int8_tmp, int8_report = _int8_candidate(
                    tmp, int8_dir, metadata, manifest, images_dir, classes, pre["size"], workers, images, labels,
                    ort_logits, onnx_metrics["accuracy"], int8_max_accuracy_drop, int8_calibration_images)
        # the fp32 model is in place; now the INT8 directory holds this model's INT8 file or nothing
        int8_path = int8_dir / INT8_FILE
        int8_dir.mkdir(parents=True, exist_ok=True)
        if int8_tmp is not None:
            os.replace(int8_tmp, int8_path)
            int8_tmp = None
            int8_report.update({"path": str(int8_path), "bytes": int8_path.stat().st_size,
                                "sha256": sha256_file(int8_path)})
        elif int8_path.exists():
            int8_path.unlink()  # an INT8 file of a previous model must not ship beside this one
    finally:
        if int8_tmp is not None and int8_tmp.exists():
            int8_tmp.unlink()
    check.update({"onnx_path": str(onnx_path), "bytes": onnx_path.stat().st_size, "sha256": sha256_file(onnx_path),
                  "opset": opset, "int8": int8_report, "model_card": str(model_card_path),
                  "seconds": round(time.time() - t0, 2)})
    atomic_write(model_card_path, model_card(metadata, ckpt, metrics, verdict, check, int8_report,
                                             data_summary(manifest), data_description))
    write_json(report_path, check)
    log.info("export: %s verified on %d test images (max |diff| %.2e, top-1 agreement %.4f, ONNX accuracy %.4f); "
             "INT8 %s", onnx_path, check["n"], check["max_abs_logit_diff"], check["top1_agreement"],
             check["onnx_accuracy"], int8_report["status"])
    return check


def _int8_candidate(fp32_path: Path, int8_dir: Path, metadata: dict, manifest: pd.DataFrame, images_dir: Path,
                    classes: list[str], size: int, workers: int, test_images: torch.Tensor, test_labels: torch.Tensor,
                    fp32_logits: np.ndarray, fp32_accuracy: float, max_drop: float,
                    max_images: int) -> tuple[Path | None, dict]:
    """Quantize the verified fp32 file into a temp file in `int8_dir`, score it on the test split and
    decide. Returns (temp path when kept, else None; the report entry)."""
    t0 = time.time()
    split = "val" if (manifest["split"] == "val").any() else "train"
    if split != "val":
        log.warning("export: no validation images; INT8 calibration uses the training split")
    calib_rows = manifest[manifest["split"] == split]
    calib_rows = calib_rows.iloc[evenly_spaced(len(calib_rows), max_images)]
    calibration, _ = split_arrays(calib_rows, images_dir, split, classes, size, workers)
    int8_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{INT8_FILE}.", suffix=".tmp", dir=int8_dir)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            recipe = quantize_int8(fp32_path, tmp, calibration)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"INT8 quantization failed ({type(exc).__name__}: {exc}); the fp32 export was not "
                              "replaced. Set export.int8=false to export the fp32 model alone") from exc
        recipe["calibration_split"] = split
        scores = score_onnx(ort_session(tmp), test_images, test_labels, classes, fp32_logits)
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
