"""The model server under load vs ONNX Runtime alone, on a real EfficientNet-Lite0, on this CPU.

In one run, on the same model file and the same input:
  1. ONNX Runtime alone (no HTTP): batch 1, one caller with all cores, and `cores` callers with one thread
     each; the better images/s is the reference.
  2. The real server (`python -m deploy.server`, a subprocess on loopback) with micro-batching off and on,
     at concurrency 1 (all threads per call) and `cores` (one thread per call): batch-1 binary-tensor
     requests (KServe v2, what tritonclient sends) from 1, 8 and 32 closed-loop clients (bench/loadgen.py,
     an asyncio client on the standard library), plus JSON tensors at 8 clients.
  3. Hot swap under load: the server follows a registry's champion while 8 clients send requests; a
     promotion and a rollback happen mid-run; every request must be answered 200.
  4. Large uploads (bench/uploads.py, issue 32): the server's peak RSS while 4 and 16 clients upload worst-case
     images (a 7000x7000 RGBA PNG, 7000x7000 JPEGs) to /api/predict at once, against a stated bound.

    .venv/bin/python bench/bench_serving.py                  # ~6-8 min on 2 cores (the model export included)
    .venv/bin/python bench/bench_serving.py --seconds 5 --configs default   # quicker
    .venv/bin/python bench/bench_serving.py --model models/model.onnx       # your exported model
    .venv/bin/python bench/bench_serving.py --uploads-only                  # only case 4 (~2 min)

Prints a table and writes bench/results/serving.json. Targets (from issue 13): binary tensors, batch 1,
8 clients: p99 < 50 ms and >= 70% of ONNX Runtime alone's images/s. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import cpu_name, stamp  # noqa: E402  (bench/ is on sys.path when run as a script)
from loadgen import run_load  # noqa: E402
from uploads import measure_uploads, print_uploads  # noqa: E402

from tasks import registry  # noqa: E402
from tasks.entry import setup_logging  # noqa: E402
from tasks.files import write_json  # noqa: E402
from tasks.inference import OnnxClassifier, session  # noqa: E402
from tasks.promote.serving_check import ServerProcess, binary_infer_body  # noqa: E402

log = logging.getLogger("bench_serving")
TARGET_P99_MS, TARGET_FRACTION = 50.0, 0.70
NAME = "classifier"


def configs(cores: int) -> dict[str, list[str]]:
    """Server settings compared: micro-batching off/on x (one call with every thread | one call per core)."""
    return {
        "batching off, 1 call x all threads": ["--no-batching", "--concurrency", "1", "--threads", str(cores)],
        "batching on, 1 call x all threads": ["--batching", "--concurrency", "1", "--threads", str(cores)],
        f"batching off, {cores} calls x 1 thread": ["--no-batching", "--concurrency", str(cores), "--threads", "1"],
        f"batching on, {cores} calls x 1 thread": ["--batching", "--concurrency", str(cores), "--threads", "1"],
    }


def export_lite0(path: Path, size: int) -> None:
    """A real EfficientNet-Lite0 (bundled ImageNet weights, seeded 2-class head), exported as the pipeline does."""
    from tasks import backbones
    from tasks.export.onnx_graph import Deployable, add_metadata, export_onnx
    from tasks.preprocess import Preprocessing

    base, meta = backbones.create("bundled", "efficientnet_lite0", "imagenet")
    weights = Preprocessing.from_dict(meta["preprocessing"])
    pre = Preprocessing(size=size, mean=weights.mean, std=weights.std)
    log.info("exporting EfficientNet-Lite0 at %d px to %s", size, path)
    export_onnx(Deployable(backbones.with_new_head(base, 2, seed=0).eval(), pre).eval(), size, path, 18)
    add_metadata(path, {"classes": json.dumps(["functional", "defective"]), "preprocessing": pre.to_json(),
                        "arch": "efficientnet_lite0 (bench: fresh 2-class head)"})


def a_second_version(src: Path, dst: Path) -> None:
    """The same network with one more metadata entry: another file (sha256), so another registry version."""
    from tasks.export.onnx_graph import add_metadata

    meta = dict(session(src, 1).get_modelmeta().custom_metadata_map)
    dst.write_bytes(src.read_bytes())
    add_metadata(dst, {**meta, "bench_copy": "2"})


def test_image(size: int) -> np.ndarray:
    """A real ELPV cell when the package is installed, through the one decode path; else seeded noise."""
    clf_size = size
    try:
        import elpv_dataset

        images = sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))
        if images:
            from tasks.images import load_for_model

            return load_for_model(images[0], clf_size)[None]
    except ImportError:
        pass
    return np.random.default_rng(0).integers(0, 256, (1, 3, clf_size, clf_size), dtype=np.uint8)


def ort_alone(path: Path, image: np.ndarray, threads: int, callers: int, seconds: float) -> dict:
    """ONNX Runtime with no server: `callers` Python threads calling one session (`threads` intra-op each)."""
    s = session(path, threads)
    for _ in range(3):
        s.run(["probabilities"], {"image": image})
    lat: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def caller():
        mine = []
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            s.run(["probabilities"], {"image": image})
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    started = time.perf_counter()
    workers = [threading.Thread(target=caller) for _ in range(callers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    ms = np.array(lat) * 1000
    return {"threads": threads, "callers": callers, "images_per_s": len(lat) * len(image) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def measure_ort(model: Path, image: np.ndarray, cores: int, seconds: float) -> tuple[dict, dict]:
    log.info("ONNX Runtime alone, batch 1: %s", model.name)
    ort = {"1 caller x all threads": ort_alone(model, image, cores, 1, seconds),
           f"{cores} callers x 1 thread": ort_alone(model, image, 1, cores, seconds)}
    return ort, max(ort.values(), key=lambda r: r["images_per_s"])


def measure_server(model: Path, chosen: dict[str, list[str]], image: np.ndarray, args) -> dict[str, dict]:
    """Each server setting, a fresh server process each, at every client count (binary tensors, batch 1)."""
    binary, headers = binary_infer_body(image)
    runs: dict[str, dict] = {}
    for label, options in chosen.items():
        with ServerProcess(model, "--poll-s", "0", *options, *args.server_args, name=NAME) as server:
            server.wait_ready(300)
            levels = {}
            for clients in args.clients:
                log.info("%s (%s): %d clients, binary tensors", label, model.name, clients)
                levels[str(clients)] = load(server, binary, headers, clients, args.seconds)
            runs[label] = {"options": options, "binary": levels}
            server.stop()
        server.cleanup()
    return runs


def quantize(fp32: Path, out: Path, size: int) -> None:
    """Static INT8 as the export stage makes it (tasks/export/int8.py), calibrated on ELPV cells when installed."""
    import torch

    from tasks.export.int8 import quantize_int8
    from tasks.export.onnx_graph import add_metadata

    try:
        import elpv_dataset

        from tasks.images import load_for_model

        files = sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))[::80][:32]
        calibration = torch.from_numpy(np.stack([load_for_model(f, size) for f in files]))
    except ImportError:
        calibration = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8)
    log.info("quantizing %s to INT8 (%d calibration images)", fp32.name, len(calibration))
    recipe = quantize_int8(fp32, out, calibration)
    add_metadata(out, {**session(fp32, 1).get_modelmeta().custom_metadata_map, "quantization": json.dumps(recipe)})


def json_body(image: np.ndarray) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "UINT8",
                                   "data": image.ravel().tolist()}],
                       "outputs": [{"name": "probabilities"}]}).encode()
    return body, {"Content-Type": "application/json"}


def load(server: ServerProcess, body: bytes, headers: dict, clients: int, seconds: float, during=None) -> dict:
    return asyncio.run(run_load("127.0.0.1", server.port, f"/v2/models/{NAME}/infer", body, headers, clients,
                                seconds, warmup_s=min(2.0, seconds / 3), during=during))


def swap_under_load(reg: Path, image: np.ndarray, args) -> dict:
    """8 clients; promote v0002 a third of the way in, roll back at two thirds; every answer must be 200."""
    body, headers = binary_infer_body(image)
    seconds = max(args.seconds * 2, 12.0)
    with ServerProcess("champion", "--registry", str(reg), "--poll-s", "0.5", *args.server_args,
                       name=NAME) as server:
        server.wait_ready(300)

        async def during(started: float) -> dict:
            events = {}
            await asyncio.sleep(2.0 + seconds / 3)  # the bench's own schedule, not a test wait
            registry.promote(reg, "2", reason="bench: promotion under load")
            events["promoted_at_s"] = round(time.perf_counter() - started, 2)
            await asyncio.sleep(seconds / 3)
            registry.rollback(reg, reason="bench: rollback under load")
            events["rolled_back_at_s"] = round(time.perf_counter() - started, 2)
            return events

        result = load(server, body, headers, 8, seconds, during)
        result["server_exit_code"] = server.stop()
    server.cleanup()
    spans: dict[str, list[float]] = {}  # version -> [first, last answer] in seconds since the start
    for t, version in result.pop("timeline") or []:
        span = spans.setdefault(version, [t, t])
        span[1] = t
    result["answered"] = spans  # during a switch, requests already running on the old model finish after the
    return result               # first answers of the new one: the spans overlap by about one request


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="an exported ONNX model (default: export a fresh Lite0)")
    ap.add_argument("--size", type=int, default=224, help="image size of the fresh Lite0 (the pipeline's CPU size)")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per load level (after a warm-up)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    ap.add_argument("--configs", choices=["all", "default"], default="all",
                    help="server settings to compare (default: only the server's defaults)")
    ap.add_argument("--int8", action="store_true", help="also quantize the model (static INT8, as the export stage "
                    "does, calibrated on 32 ELPV images) and measure ORT alone and the server's defaults on it")
    ap.add_argument("--upload-clients", type=int, nargs="+", default=[4, 16], help="concurrent large uploads")
    ap.add_argument("--uploads-only", action="store_true", help="only the large-upload case (written to "
                    "bench/results/serving_uploads.json)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra server options (last)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/serving.json (serving_uploads.json "
                    "with --uploads-only)")
    args = ap.parse_args(argv)
    args.out = args.out or REPO / f"bench/results/serving{'_uploads' if args.uploads_only else ''}.json"
    setup_logging()
    load_before = os.getloadavg()
    cores = os.cpu_count() or 1
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "lite0.onnx"
            export_lite0(model, args.size)
        size = OnnxClassifier(model, threads=1).preprocessing.size
        if args.uploads_only:
            return uploads_only(model, tmp, args, load_before, t_start)
        image = test_image(size)
        reg = tmp / "registry"
        registry.register(reg, {"model.onnx": model}, {"note": "bench"})
        a_second_version(model, tmp / "copy.onnx")
        registry.register(reg, {"model.onnx": tmp / "copy.onnx"}, {"note": "bench copy"})
        registry.promote(reg, "1")

        ort, reference = measure_ort(model, image, cores, args.seconds)
        chosen = configs(cores) if args.configs == "all" else {"server defaults": []}
        runs = measure_server(model, chosen, image, args)
        default_label = "server defaults" if "server defaults" in runs else _defaults_label(cores)
        with ServerProcess(model, "--poll-s", "0", *args.server_args, name=NAME) as server:
            server.wait_ready(300)
            log.info("server defaults: 8 clients, JSON tensors")
            jbody, jheaders = json_body(image)
            json_run = load(server, jbody, jheaders, 8, args.seconds)
            server.stop()
        server.cleanup()
        log.info("hot swap under load: promote, then roll back")
        swap = swap_under_load(reg, image, args)
        int8 = None
        if args.int8:
            int8_path = tmp / "model.int8.onnx"
            quantize(model, int8_path, size)
            int8_ort, int8_ref = measure_ort(int8_path, image, cores, args.seconds)
            int8_runs = measure_server(int8_path, {"server defaults": []}, image, args)
            int8 = {"ort_alone": int8_ort, "ort_reference": int8_ref, "server": int8_runs}
        log.info("large uploads: %s concurrent worst-case images", args.upload_clients)
        uploads = measure_uploads(model, tmp / "uploads", args.upload_clients, args.server_args, NAME)

    at8 = runs[default_label]["binary"].get("8")
    targets = None
    if at8:
        fraction = at8["requests_per_s"] / reference["images_per_s"]
        targets = {"p99_ms_at_8": at8["p99_ms"], "p99_met": at8["p99_ms"] < TARGET_P99_MS,
                   "fraction_of_ort": fraction, "fraction_met": fraction >= TARGET_FRACTION,
                   "errors": sum(lvl["errors"] for r in runs.values() for lvl in r["binary"].values()),
                   "swap_errors": swap["errors"]}
        int8_at8 = int8["server"]["server defaults"]["binary"].get("8") if int8 else None
        if int8_at8:  # what `--precision int8` serves: the same server, the INT8 file
            targets.update(int8_p99_ms_at_8=int8_at8["p99_ms"], int8_p99_met=int8_at8["p99_ms"] < TARGET_P99_MS)
    import onnxruntime as ort_mod

    out = {
        "model": {"path": str(args.model or "fresh EfficientNet-Lite0 (bundled ImageNet weights, seeded 2-class head)"),
                  "image_size": size},
        "machine": {"cpu": cpu_name(), "cores": cores, "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "onnxruntime": ort_mod.__version__},
        **stamp(REPO),
        "command": " ".join(["bench/bench_serving.py", *(argv if argv is not None else sys.argv[1:])]),
        "ort_alone": ort, "ort_reference": reference, "server": runs, "server_default": default_label,
        "json_tensors_at_8": json_run, "swap_under_load": swap, "targets": targets, "int8": int8,
        "large_uploads": uploads, "seconds": round(time.time() - t_start, 1),
    }
    print_table(out)
    print_uploads(uploads)
    write_json(args.out, out)
    print(f"\nwritten: {args.out} ({out['seconds']:.0f} s)")
    return out


def uploads_only(model: Path, tmp: Path, args, load_before, t_start: float) -> dict:
    from common import provenance

    uploads = measure_uploads(model, tmp / "uploads", args.upload_clients, args.server_args, NAME)
    command = " ".join(["bench/bench_serving.py", *(sys.argv[1:])])
    out = {**provenance(REPO, command, load_before=load_before), "model": str(args.model or "fresh Lite0"),
           "large_uploads": uploads, "seconds": round(time.time() - t_start, 1)}
    print_uploads(uploads)
    write_json(args.out, out)
    print(f"\nwritten: {args.out} ({out['seconds']:.0f} s)")
    return out


def _defaults_label(cores: int) -> str:
    """Which compared config the server's own defaults are (deploy/server.py Settings)."""
    from deploy.server import Settings

    d = Settings()
    if (d.concurrency or cores) == 1 and cores > 1:
        return f"batching {'on' if d.batching else 'off'}, 1 call x all threads"
    return f"batching {'on' if d.batching else 'off'}, {cores} calls x 1 thread"


def print_table(out: dict) -> None:
    m = out["machine"]
    print(f"\nServing {out['model']['path']} at {out['model']['image_size']} px on {m['cpu']} ({m['cores']} cores; "
          f"load average before {m['loadavg_before'][0]}, after {m['loadavg_after'][0]})")
    print("\nONNX Runtime alone, batch 1:")
    for label, r in out["ort_alone"].items():
        print(f"  {label:<28} {r['images_per_s']:7.1f} img/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms")
    ref = out["ort_reference"]["images_per_s"]
    head = f"\n{'server (binary tensors, batch 1)':<40}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}" \
           f"{'x ORT':>8}{'errors':>8}"
    print(head)
    print("-" * (len(head) - 1))
    for label, r in out["server"].items():
        mark = " *" if label == out["server_default"] else ""
        for clients, lvl in r["binary"].items():
            print(f"{label + mark:<40}{clients:>8}{lvl['requests_per_s']:>9.1f}{lvl['p50_ms']:>9.1f}{lvl['p95_ms']:>9.1f}"
                  f"{lvl['p99_ms']:>9.1f}{lvl['requests_per_s'] / ref:>8.2f}{lvl['errors']:>8}")
    j = out["json_tensors_at_8"]
    print(f"{'defaults, JSON tensors':<40}{8:>8}{j['requests_per_s']:>9.1f}{j['p50_ms']:>9.1f}{j['p95_ms']:>9.1f}"
          f"{j['p99_ms']:>9.1f}{j['requests_per_s'] / ref:>8.2f}{j['errors']:>8}")
    if out.get("int8"):
        i8 = out["int8"]
        i8ref = i8["ort_reference"]["images_per_s"]
        for label, r in i8["ort_alone"].items():
            print(f"INT8, ONNX Runtime alone, {label}: {r['images_per_s']:.1f} img/s, p99 {r['p99_ms']:.1f} ms")
        for label, r in i8["server"].items():
            for clients, lvl in r["binary"].items():
                print(f"{'INT8, ' + label:<40}{clients:>8}{lvl['requests_per_s']:>9.1f}{lvl['p50_ms']:>9.1f}"
                      f"{lvl['p95_ms']:>9.1f}{lvl['p99_ms']:>9.1f}{lvl['requests_per_s'] / i8ref:>8.2f}{lvl['errors']:>8}")
    s = out["swap_under_load"]
    print(f"\nhot swap under load (8 clients): {s['requests']} requests measured, statuses {s['statuses']}, errors "
          f"{s['errors']}; p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms; {s['side']}; answered by (first, last "
          f"second): {s['answered']}")
    t = out["targets"]
    if t:
        met = {True: "met", False: "NOT met"}
        print(f"\n* = the server's defaults. Targets at 8 clients: p99 {t['p99_ms_at_8']:.1f} ms < {TARGET_P99_MS:.0f} ms "
              f"{met[t['p99_met']]}; {100 * t['fraction_of_ort']:.0f}% of ONNX Runtime alone's {ref:.1f} img/s >= "
              f"{100 * TARGET_FRACTION:.0f}% {met[t['fraction_met']]}; errors {t['errors']}, during swaps "
              f"{t['swap_errors']}")
        if "int8_p99_ms_at_8" in t:
            print(f"  INT8 model (`--precision int8`), the same server settings: p99 {t['int8_p99_ms_at_8']:.1f} ms "
                  f"< {TARGET_P99_MS:.0f} ms {met[t['int8_p99_met']]}")


if __name__ == "__main__":
    main()
