"""The frozen prefix run by ONNX Runtime when the feature cache is filled on a CPU (`train.prefix_runtime`).

Filling the cache is inference: frozen layers in eval mode, no gradients. On CPU, ONNX Runtime runs
that part 3.6x (224 px) to 5x (300 px) faster than PyTorch eager for EfficientNet-Lite0 (it fuses
convolution, BatchNorm and activation; `bench/bench_train.py` measures it), and at 224 px the prefix
took about 40% of an unfrozen epoch. The outputs agree with PyTorch's to float rounding (about 1e-6
relative), the same agreement the cached and uncached loops had already.

The graph is exported for exactly one batch size (the cache always computes chunks of `batch_size`
images, padded), so every entry comes from the same kernels, whenever it is computed: a resumed run
refills its cache with the same bits.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from tasks.device import Precision
from tasks.train.staging import StagedModel, eval_mode

log = logging.getLogger("tasks.train")

Prefix = Callable[[torch.Tensor], torch.Tensor]

# below this many prefix batches in a stage, exporting the graph (~5 s) costs more than it saves (~0.1 s a batch)
MIN_BATCHES = 100


def wants_onnx_prefix(runtime: str, device: torch.device, precision: Precision, n_train: int, n_val: int,
                      epochs: int, n_variants: int, batch_size: int) -> bool:
    """`train.prefix_runtime`: onnxruntime = always on CPU in fp32; auto = there too, when the stage computes enough
    cache entries to pay for the export; torch = never."""
    if runtime == "torch":
        return False
    if device.type != "cpu" or precision.dtype is not None:
        if runtime == "onnxruntime":
            log.info("train: frozen layers stay in PyTorch (prefix_runtime=onnxruntime is for CPU runs in fp32)")
        return False
    batches = (n_train * min(epochs, n_variants) + n_val) / batch_size
    return runtime == "onnxruntime" or batches >= MIN_BATCHES


class _PrefixModule(nn.Module):
    def __init__(self, staged: StagedModel):
        super().__init__()
        self.model, self._staged = staged.model, staged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._staged.prefix(x)


def onnx_prefix(staged: StagedModel, size: int, batch_size: int, threads: int) -> Prefix | None:
    """A function computing `staged.prefix` on (batch_size, 3, size, size) float batches with ONNX Runtime; None
    (the caller keeps PyTorch) when this network's prefix does not export."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    example = torch.zeros((batch_size, 3, size, size))
    try:
        with eval_mode(staged.model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_PrefixModule(staged).eval(), (example,), dynamo=True, optimize=True,
                                        verify=False, verbose=False, input_names=["x"], output_names=["features"])
            proto = program.model_proto.SerializeToString()
    except Exception as exc:  # any exporter failure: the PyTorch prefix gives the same features, only slower
        log.info("train: frozen layers stay in PyTorch (ONNX export failed: %s)", str(exc).splitlines()[0][:200])
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # no busy-waiting between calls: PyTorch's training step needs those cores right after
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    log.info("train: frozen layers run in ONNX Runtime for the feature cache (exported in %.1fs)",
             time.perf_counter() - t0)

    def run(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != tuple(example.shape):
            raise ValueError(f"prefix graph takes {tuple(example.shape)}, got {tuple(x.shape)}")
        out = session.run(None, {"x": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)

    return run
