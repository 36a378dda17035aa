"""A Triton Inference Server model repository for an exported model (`finetune export-triton`).

    OUT/NAME/config.pbtxt      platform onnxruntime_onnx, max_batch_size, dynamic batching, CPU instances
    OUT/NAME/labels.txt        the class names, one per line in output order (Triton does not read ONNX
                               metadata; the classification extension and KServe's Triton runtime use this)
    OUT/NAME/VERSION/model.onnx

VERSION is the registry version's number (v0003 -> 3), or 1 for a file. The model directory is built
beside its destination and renamed into place, so a reader sees it complete or not at all. Tensor names,
datatypes and shapes come from the ONNX model itself; with `max_batch_size > 0` Triton adds the batch
dimension, so `dims` leave it out. The same repository is what KServe's built-in ONNX runtime (Triton)
serves (deploy/kserve/inferenceservice-triton.yaml).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deploy.protocol import TensorSpec
from deploy.service import Source, load
from tasks.files import atomic_write, fsync_dir

TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                "BYTES": "TYPE_STRING"}
LABELS = "labels.txt"


class TritonExportError(ValueError):
    """The model cannot be written as a Triton repository; the message says why."""


@dataclass(frozen=True)
class Exported:
    model_dir: Path
    version: int
    config: str


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    if not batched:
        return list(spec.shape)
    if spec.shape[0] != -1:
        raise TritonExportError(f"tensor '{spec.name}' has a fixed first dimension {spec.shape[0]}; Triton batching "
                                "needs a variable batch dimension (use --max-batch-size 0)")
    return list(spec.shape[1:])


def _tensor(spec: TensorSpec, batched: bool, extra: str = "") -> str:
    dims = ", ".join(str(d) for d in _dims(spec, batched))
    return (f'  {{\n    name: "{spec.name}"\n    data_type: {TRITON_TYPES[spec.datatype]}\n'
            f"    dims: [ {dims} ]{extra}\n  }}")


def config_pbtxt(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int,
                 queue_delay_us: int, instances: int) -> str:
    """The model configuration in protobuf text format (Triton's `ModelConfig`)."""
    batched = max_batch_size > 0
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(_tensor(s, batched, "\n    format: FORMAT_NCHW" if len(s.shape) == 4 else "")
                                   for s in inputs), "]",
             "output [", ",\n".join(_tensor(s, batched, f'\n    label_filename: "{LABELS}"') for s in outputs), "]"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]")
    return "\n".join(lines) + "\n"


def export(model: str, out_dir: Path, registry: Path = Path("registry"), name: str = "classifier",
           max_batch_size: int = 32, queue_delay_us: int = 100, instances: int = 1, force: bool = False) -> Exported:
    """Write OUT/NAME/ for `model` (a file, a registry version, or 'champion')."""
    if max_batch_size < 0 or queue_delay_us < 0 or instances < 1:
        raise TritonExportError("--max-batch-size and --queue-delay-us cannot be negative, --instances must be >= 1")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise TritonExportError(f"'{name}' is not a usable model name (a folder name without slashes)")
    loaded = load(Source.parse(model, registry), name, threads=1)  # checked: the outputs match the classes
    number = int(loaded.version[1:]) if loaded.version.startswith("v") else 1
    config = config_pbtxt(name, list(loaded.inputs.values()), list(loaded.outputs.values()), max_batch_size,
                          queue_delay_us, instances)
    path, classes = loaded.path, loaded.classes
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    if final.exists() and not force:
        raise TritonExportError(f"{final} exists; use --force to replace it")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        atomic_write(staging / "config.pbtxt", config)
        atomic_write(staging / LABELS, "".join(f"{c}\n" for c in classes))
        (staging / str(number)).mkdir()
        shutil.copyfile(path, staging / str(number) / "model.onnx")
        os.chmod(staging, 0o755)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=out_dir))
            os.replace(final, old / name)
            os.rename(staging, final)
            shutil.rmtree(old)
        else:
            os.rename(staging, final)
        fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(final, number, config)
