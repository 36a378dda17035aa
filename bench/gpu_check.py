"""Exercise the trainer's CUDA paths and print their throughput: fp32, AMP bf16, AMP fp16 (grad
scaling), channels_last (always on in the trainer), torch.compile, and DDP through torchrun.

Runs the real `tasks.train.fit` on synthetic images with the bundled EfficientNet-Lite0, one
stage at a time (frozen head on cached features; all layers), and reports the images/s of the
last epoch (the first one pays for cudnn autotuning, compilation and the cache) and how long each
step waited for its batch (`data_wait_s` of the history), with batches prefetched on a background
thread (`train.prefetch_batches`, pinned memory and a side CUDA stream) and, for comparison, read inline.

    python bench/gpu_check.py                      # on a CUDA machine: every check, ~3-5 min on one GPU
    python bench/gpu_check.py --device cpu --images 64 --size 96 --epochs 1   # smoke test of the script itself

DDP: with 2+ GPUs, 2 processes with NCCL; with one GPU, 2 processes share it over gloo (checks the
code path, not the speed-up). Writes bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import backbones as models  # noqa: E402
from tasks.device import pick_device  # noqa: E402
from tasks.params import DIHEDRAL_AUGMENT, StageParams, TrainParams  # noqa: E402
from tasks.train.loop import Data, Split, fit  # noqa: E402
from tasks.train.runtime import Dist, init_distributed  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def synthetic(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand((n, 3, size, size), generator=g) * 80 + 40 + 100 * y.view(-1, 1, 1, 1)).clamp(0, 255)
    return x.to(torch.uint8), y


def one_run(args, amp: str, compile_: bool, trainable, device: torch.device, dist=Dist(), prefetch: int = 2) -> dict:
    x, y = synthetic(args.n, args.size)
    vx, vy = synthetic(max(32, args.n // 8), args.size, seed=1)
    model, _ = models.create("bundled", "efficientnet_lite0", "imagenet")
    model = models.with_new_head(model, 2, seed=0)
    params = TrainParams(image_size=args.size, cpu_image_size=args.size, batch_size=args.batch_size, amp=amp,
                         augment=DIHEDRAL_AUGMENT,
                         compile=compile_, imbalance="none", prefetch_batches=prefetch, stages=[
                             StageParams(name="s", epochs=args.epochs, trainable=trainable, lr=1e-3, bn="eval")])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    _, best, history = fit(model, Data(["a", "b"], Split(x, y), Split(vx, vy)), params, MEAN, STD, 0, device, dist)
    wall = time.time() - t0
    last = history[-1]
    steps = math.ceil(args.n / args.batch_size)  # each rank takes its share of every batch
    return {"amp": amp, "compile": compile_, "trainable": str(trainable), "images_per_s": round(last["images_per_s"], 1),
            "prefetch_batches": prefetch, "data_wait_ms_per_step": round(1000 * last["data_wait_s"] / steps, 2),
            "first_epoch_s": round(history[0]["seconds"], 1), "wall_s": round(wall, 1),
            "val_accuracy": round(best["val"]["accuracy"], 3), "train_loss": round(last["train_loss"], 4),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
            "processes": dist.world}


def ddp_worker(args) -> None:
    """One torchrun process: join the group, train, rank 0 writes its result."""
    dist = init_distributed()
    device = pick_device(dist.local_rank) if args.device == "cuda" else torch.device("cpu")
    amp = "bf16" if device.type == "cuda" else "off"
    try:
        result = one_run(args, amp, False, "all", device, dist)
        if dist.main:
            Path(args.ddp_out).write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def run_ddp(args) -> dict | None:
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    out = ROOT / "bench" / "results" / "gpu_check_ddp.json"
    env = dict(os.environ)
    if args.device == "cuda" and gpus < 2:
        env["FINETUNE_DIST_BACKEND"] = "gloo"  # two processes cannot share one GPU under NCCL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, "--ddp-worker", "--ddp-out", str(out), "--device", args.device, "--images", str(args.n),
           "--size", str(args.size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {"amp": "bf16", "compile": False, "trainable": "all", "processes": 2, "error": proc.stderr[-300:]}
    result = json.loads(out.read_text())
    result["backend"] = env.get("FINETUNE_DIST_BACKEND", "nccl" if args.device == "cuda" else "gloo")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", dest="n", type=int, default=2048, help="synthetic training images")
    ap.add_argument("--size", type=int, default=300, help="image size (ELPV: 300)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amps = ["off", "bf16", "fp16"] if device.type == "cuda" else ["off"]
    results = []
    for trainable in ("head", "all"):
        for amp in amps:
            results.append(one_run(args, amp, False, trainable, device))
            print(results[-1], flush=True)
    results.append(one_run(args, "bf16" if device.type == "cuda" else "off", False, "all", device, prefetch=0))
    print(results[-1], flush=True)  # the same as the run above it but reading batches inline: what prefetching buys
    if not args.skip_compile and device.type == "cuda":
        results.append(one_run(args, "bf16", True, "all", device))
        print(results[-1], flush=True)
    if not args.skip_ddp:
        results.append(run_ddp(args))
        print(results[-1], flush=True)
    print(f"\n{'trainable':9} {'amp':5} {'compile':7} {'procs':5} {'prefetch':8} {'img/s':>8} {'wait ms/step':>12} "
          f"{'1st epoch s':>11} {'val acc':>7} {'mem GB':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['trainable']:9} {r['amp']:5} {'-':7} {r['processes']:5} FAILED: {r['error'][-120:]}")
            continue
        print(f"{r['trainable']:9} {r['amp']:5} {str(r['compile']):7} {r['processes']:5} {r['prefetch_batches']:8} "
              f"{r['images_per_s']:8.1f} {r['data_wait_ms_per_step']:12.2f} {r['first_epoch_s']:11.1f} "
              f"{r['val_accuracy']:7.3f} {str(r['peak_mem_gb']):>6}")
    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "n": args.n, "size": args.size,
            "batch_size": args.batch_size, "epochs": args.epochs}
    out = ROOT / "bench" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
