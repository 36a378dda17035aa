"""ONNX Runtime (fp32, INT8) vs PyTorch eager (contiguous, channels_last) on this CPU.

Latency p50/p95 and throughput at batch 1 and 32, all engines in one run with the same thread
count and the same uint8 input (every engine includes the normalisation, as the exported
model does), plus test-split accuracy of each engine when the pipeline's outputs exist
(`models/model.pt`, `models/model.onnx`, `data/validated.csv`). Without them it times a
freshly initialised EfficientNet-Lite0 (bundled ImageNet weights, new 2-class head) at the
checkpoint's image size (or `train.*` params' CPU size) and marks accuracy n/a.

    .venv/bin/python bench/bench_onnx.py                 # default: ~1-3 min on 2 cores
    .venv/bin/python bench/bench_onnx.py --threads 1 --iters 50 --iters-large 10

Prints a table and writes bench/results/onnx.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from common import cpu_name, stamp  # noqa: E402  (bench/ is on sys.path when run as a script)

from tasks import backbones
from tasks.checkpoint import load_checkpoint
from tasks.entry import setup_logging
from tasks.export.int8 import evenly_spaced, quantize_int8
from tasks.export.onnx_graph import Deployable, export_onnx
from tasks.files import read_json, write_json
from tasks.manifest import read_manifest
from tasks.preprocess import Preprocessing
from tasks.tensors import split_arrays

log = logging.getLogger("bench_onnx")
TARGETS = {"ort_fp32_speedup": 1.5, "ort_int8_speedup": 2.5, "int8_max_accuracy_drop": 0.01}
ENGINES = ("pytorch eager", "pytorch eager channels_last", "onnxruntime fp32", "onnxruntime int8")


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def make_engines(module: torch.nn.Module, fp32_path: Path, int8_path: Path, threads: int) -> dict:
    """name -> f(uint8 NCHW numpy batch) -> logits (numpy)."""
    eager = module.eval()
    eager_cl = copy.deepcopy(module).to(memory_format=torch.channels_last).eval()
    s32, s8 = ort_session(fp32_path, threads), ort_session(int8_path, threads)

    def run_eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return eager(torch.from_numpy(x))[0].numpy()

    def run_eager_cl(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return eager_cl(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))[0].numpy()

    return {
        "pytorch eager": run_eager,
        "pytorch eager channels_last": run_eager_cl,
        "onnxruntime fp32": lambda x: s32.run(["logits"], {"image": x})[0],
        "onnxruntime int8": lambda x: s8.run(["logits"], {"image": x})[0],
    }


def time_engine(fn, batch: np.ndarray, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn(batch)
    lat = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(batch)
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1000
    return {"batch": len(batch), "iters": iters, "p50_ms": float(np.percentile(lat_ms, 50)),
            "p95_ms": float(np.percentile(lat_ms, 95)), "images_per_s": float(len(batch) * iters / sum(lat))}


def accuracy(fn, images: np.ndarray, labels: np.ndarray, batch: int = 32) -> tuple[float, np.ndarray]:
    pred = np.concatenate([fn(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((pred == labels).mean()), pred


def setup(args, work: Path) -> dict:
    """The model under test in all four forms, plus test data when the pipeline outputs exist."""
    ckpt_path, onnx_path, manifest_path = Path(args.checkpoint), Path(args.onnx), Path(args.manifest)
    pipeline = ckpt_path.exists() and onnx_path.exists() and manifest_path.exists() and not args.fresh
    info: dict = {"mode": "pipeline" if pipeline else "fresh"}
    size = args.size
    if ckpt_path.exists():
        model, ckpt = load_checkpoint(ckpt_path)
        size = size or ckpt.preprocessing.size
    if not size:
        try:
            from tasks.params import load_params

            t = load_params(REPO / "params.yaml").train
            size = min(t.image_size, t.cpu_image_size) if t.cpu_image_size else t.image_size
        except Exception:  # noqa: BLE001 - any params problem: the default size
            size = 224
    if pipeline:
        pre, classes = ckpt.preprocessing, ckpt.classes
        if pre.size != size:
            raise SystemExit(f"--size {size} differs from the checkpoint's {pre.size}; drop --size or use --fresh")
        module = Deployable(model, pre).eval()
        fp32 = onnx_path
        info.update(arch=ckpt.base["arch"], classes=classes, checkpoint=str(ckpt_path), onnx=str(onnx_path))
    else:
        base, meta = backbones.create("bundled", "efficientnet_lite0", "imagenet")
        weights_pre = Preprocessing.from_dict(meta["preprocessing"])
        pre = Preprocessing(size=size, mean=weights_pre.mean, std=weights_pre.std)
        module = Deployable(backbones.with_new_head(base, 2, seed=0).eval(), pre).eval()
        fp32 = work / "model.onnx"
        log.info("exporting a fresh Lite0 at %d px to %s", size, fp32)
        export_onnx(module, size, fp32, 18)
        info.update(arch="efficientnet_lite0 (fresh 2-class head)", classes=None)
    info["image_size"] = size

    test = labels = None
    manifest = read_manifest(manifest_path) if pipeline else None
    if pipeline and not args.no_accuracy:
        images, y = split_arrays(manifest, Path(args.images), "test", info["classes"], size, args.workers)
        keep = evenly_spaced(len(images), args.accuracy_images or len(images))
        test, labels = images[torch.from_numpy(keep)].numpy(), y.numpy()[keep]
        info["accuracy_images"] = len(keep)

    int8 = Path(args.int8)
    if pipeline and int8.exists():
        info["int8"] = {"source": "pipeline", "path": str(int8)}
    else:
        why = "no pipeline outputs" if not pipeline else "the pipeline kept no INT8 model"
        report = Path(args.report)
        if pipeline and report.exists():
            why += f" (export report: INT8 {read_json(report).get('int8', {}).get('status', 'not recorded')})"
        if pipeline:
            calib, _ = split_arrays(manifest, Path(args.images), "val", info["classes"], size, args.workers)
            calib = calib[torch.from_numpy(evenly_spaced(len(calib), args.calibration_images))]
            calib_from = f"{len(calib)} validation images"
        else:
            calib = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            calib_from = "32 random images (timing only)"
        int8 = work / "model.int8.onnx"
        log.info("quantizing %s here (%s), calibrated on %s", fp32, why, calib_from)
        quantize_int8(fp32, int8, calib)
        info["int8"] = {"source": f"quantized by the bench: {why}", "calibration": calib_from}
    return {"module": module, "fp32": fp32, "int8": int8, "test": test, "labels": labels, "info": info}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine (default: all cores)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations at batch sizes < 8 (default 20)")
    ap.add_argument("--iters-large", type=int, default=3, help="timed iterations at batch sizes >= 8 (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    ap.add_argument("--accuracy-images", type=int, default=0, help="cap on test images for accuracy (0 = all)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy pass")
    ap.add_argument("--calibration-images", type=int, default=256, help="if the bench quantizes: cap on val images")
    ap.add_argument("--fresh", action="store_true", help="time a fresh Lite0 even if pipeline outputs exist")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the checkpoint's, else params)")
    ap.add_argument("--checkpoint", default="models/model.pt")
    ap.add_argument("--onnx", default="models/model.onnx")
    ap.add_argument("--int8", default="models/int8/model.int8.onnx")
    ap.add_argument("--manifest", default="data/validated.csv")
    ap.add_argument("--images", default="data/images")
    ap.add_argument("--report", default="reports/export.json", help="the export report (why INT8 may be missing)")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads")
    ap.add_argument("--out", default=str(REPO / "bench/results/onnx.json"))
    args = ap.parse_args(argv)
    setup_logging()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    t_start, load_before = time.time(), os.getloadavg()
    cores = os.cpu_count() or 1
    if load_before[0] + args.threads > cores + 0.5:
        log.warning("the machine is busy (load %.1f on %d cores): timings with %d threads are contended, PyTorch's "
                    "most (its threads wait for each other); for fair ratios use --threads %d or an idle machine",
                    load_before[0], cores, args.threads, max(1, int(cores - load_before[0])))
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as work:
        s = setup(args, Path(work))
        info, size = s["info"], s["info"]["image_size"]
        engines = make_engines(s["module"], s["fp32"], s["int8"], args.threads)
        rng = np.random.default_rng(0)
        results: dict[str, dict] = {name: {"timing": {}} for name in ENGINES}
        for b in args.batches:
            if s["test"] is not None and len(s["test"]) >= b:
                batch = np.ascontiguousarray(s["test"][:b])
            else:
                batch = rng.integers(0, 256, (b, 3, size, size), dtype=np.uint8)
            iters = args.iters if b < 8 else args.iters_large
            for name in ENGINES:  # one engine at a time: no engine's idle spinning threads slow another
                r = time_engine(engines[name], batch, args.warmup, iters)
                results[name]["timing"][str(b)] = r
                log.info("%-28s batch %3d: p50 %8.1f ms  p95 %8.1f ms  %7.1f img/s", name, b, r["p50_ms"], r["p95_ms"],
                         r["images_per_s"])
        preds = {}
        for name in ENGINES:
            if s["test"] is None:
                results[name]["accuracy"] = None
                continue
            results[name]["accuracy"], preds[name] = accuracy(engines[name], s["test"], s["labels"])
        if preds:
            for name in ENGINES:
                results[name]["top1_agreement_vs_eager"] = float((preds[name] == preds["pytorch eager"]).mean())
        elapsed = time.time() - t_start

    base = results["pytorch eager"]["timing"]
    base_cl = results["pytorch eager channels_last"]["timing"]
    for name in ENGINES:
        for b, r in results[name]["timing"].items():
            r["speedup_vs_eager"] = r["images_per_s"] / base[b]["images_per_s"]
            r["speedup_vs_eager_channels_last"] = r["images_per_s"] / base_cl[b]["images_per_s"]
    acc32, acc8 = results["onnxruntime fp32"].get("accuracy"), results["onnxruntime int8"].get("accuracy")
    drop = None if acc32 is None or acc8 is None else acc32 - acc8

    def verdict(name: str, bound: float) -> dict:
        ratios = {b: r["speedup_vs_eager"] for b, r in results[name]["timing"].items()}
        return {"target": f">= {bound}x eager throughput", "ratios": ratios, "met": all(v >= bound for v in ratios.values())}

    targets = {"ort_fp32": verdict("onnxruntime fp32", TARGETS["ort_fp32_speedup"]),
               "ort_int8": verdict("onnxruntime int8", TARGETS["ort_int8_speedup"])}
    targets["ort_int8"]["accuracy_drop_vs_fp32"] = drop
    targets["ort_int8"]["accuracy_target"] = f"drop <= {100 * TARGETS['int8_max_accuracy_drop']:.0f} pt"
    targets["ort_int8"]["accuracy_met"] = None if drop is None else drop <= TARGETS["int8_max_accuracy_drop"] + 1e-9
    out = {
        "setup": info,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
        **stamp(REPO),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": results,
        "targets": targets,
        "seconds": round(elapsed, 1),
    }
    print_table(out)
    write_json(args.out, out)
    print(f"\nwritten: {args.out} ({elapsed:.0f} s)")
    return out


def print_table(out: dict) -> None:
    setup_, m = out["setup"], out["machine"]
    print(f"\nONNX Runtime vs PyTorch eager on {m['cpu']} ({m['cores']} cores, {m['threads']} threads; load avg "
          f"before {m['loadavg_before'][0]}), {setup_['mode']} model {setup_['arch']} at {setup_['image_size']} px")
    print(f"INT8: {setup_['int8']['source']}")
    batches = list(out["results"]["pytorch eager"]["timing"])
    head = f"{'engine':<28}" + "".join(f"{'b' + b + ' p50 ms':>12}{'p95 ms':>9}{'img/s':>9}{'x eager':>9}" for b in batches)
    print("\n" + head + f"{'accuracy':>10}")
    print("-" * len(head) + "-" * 10)
    for name, r in out["results"].items():
        cells = "".join(f"{t['p50_ms']:>12.1f}{t['p95_ms']:>9.1f}{t['images_per_s']:>9.1f}{t['speedup_vs_eager']:>8.2f}x"
                        for t in r["timing"].values())
        acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}%"
        print(f"{name:<28}{cells}{acc:>10}")
    t = out["targets"]
    met = {True: "met", False: "NOT met", None: "n/a"}
    print(f"\ntarget ORT fp32 >= {TARGETS['ort_fp32_speedup']}x eager: {met[t['ort_fp32']['met']]}; "
          f"INT8 >= {TARGETS['ort_int8_speedup']}x eager: {met[t['ort_int8']['met']]}; INT8 accuracy drop <= 1 pt: "
          f"{met[t['ort_int8']['accuracy_met']]}"
          + ("" if t["ort_int8"]["accuracy_drop_vs_fp32"] is None
             else f" ({100 * t['ort_int8']['accuracy_drop_vs_fp32']:+.2f} pt)"))


if __name__ == "__main__":
    main()
