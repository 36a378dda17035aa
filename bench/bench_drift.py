"""Drift monitoring on ELPV: false alarms on clean traffic, detection of planted and natural shifts, the cost of a
test, and the server's throughput with monitoring on vs off.

The model is an exported ELPV classifier with its `embedding` output and drift reference (the pipeline's
`models/model.onnx`; `make run` or bench_elpv.py makes it). Every image goes through the model's own decode path
(`OnnxClassifier.load`, what the server does with an upload), ONNX Runtime and `tasks.drift.image_statistics` (on the
same uint8 tensor the model is fed), once; the streams then replay those rows through `tasks.drift.Stream`, the
object the server runs (window, schedule, the k-in-a-row alarm), so the numbers are the server's without HTTP in the
way. A reference written before the image statistics gives the numbers of the embedding and softmax detectors alone.

- clean traffic: the test split (654 cells; never used by training, the PCA or the reference). False-alarm rate of
  single tests on random windows (without replacement), and long clean streams (images drawn with replacement) for
  the expected run length without an alarm (ARL0, in requests).
- planted shifts, applied to the original 300 x 300 cell before the model's decode: brightness x0.8, Gaussian noise
  (sigma 0.08 x 255, ImageNet-C severity 1), Gaussian blur (sigma 1 and 2: ImageNet-C severities 1 and 2). Each
  trial fills the window with clean traffic (a random phase of the test schedule), then sends shifted images until
  the alarm: detection within 100 requests, and requests until detection. Images are drawn as whole permutations of
  the pool, so a window holds distinct images, as real traffic does.
- the natural shift mono -> poly (ELPV's cell type): a deployment that only saw monocrystalline cells (the reference
  rebuilt from the mono training and validation cells through the same model) starts seeing polycrystalline ones;
  its clean traffic is the mono test cells.
- cost: `tasks.drift.Stream.test` on a full window (the image statistics of the `every` new images, as the server
  computes them in its test thread, and the test), and in the server (its drift_test_duration_seconds) under load.
- throughput: the real server (`python -m deploy.server`, default settings), 8 closed-loop clients sending binary
  tensors, monitoring off and on alternately, `--rounds` (3) times each, in one run: the ratio of requests/s, and of
  the server process's CPU time per request (from /proc; steadier on a shared machine).

    .venv/bin/python bench/bench_drift.py                     # models/model.onnx, data/validated.csv, data/images
    .venv/bin/python bench/bench_drift.py --model PATH --trials 200 --seconds 8
    .venv/bin/python bench/bench_drift.py --trials 50 --streams 2 --skip-sweep --skip-throughput   # a quick look

Prints a table and writes bench/results/drift.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from common import provenance  # noqa: E402  (bench/ is on sys.path when run as a script)
from loadgen import run_load  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from deploy.settings import DriftSettings  # noqa: E402
from tasks import drift  # noqa: E402
from tasks.entry import setup_logging  # noqa: E402
from tasks.files import write_json  # noqa: E402
from tasks.inference import OnnxClassifier, read_metadata  # noqa: E402
from tasks.manifest import read_manifest  # noqa: E402
from tasks.promote.serving_check import ServerProcess, binary_infer_body  # noqa: E402

log = logging.getLogger("bench_drift")
NAME = "classifier"
SHIFTS = ("brightness x0.8", "gaussian noise (sigma 20)", "gaussian blur (sigma 1)", "gaussian blur (sigma 2)")


def shifted_png(path: Path, shift: str, rng: np.random.Generator) -> bytes:
    """The cell as a camera with that change would have recorded it (on the original image), as PNG bytes."""
    image = Image.open(path).convert("L")
    if shift.startswith("gaussian blur"):
        sigma = float(shift.split("sigma ")[1].rstrip(")"))
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))  # Pillow's radius is the Gaussian's sigma
    else:
        a = np.asarray(image, np.float32)
        a = a * 0.8 if shift == "brightness x0.8" else a + rng.normal(0.0, 0.08 * 255, a.shape)
        image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def outputs(clf: OnnxClassifier, sources: list, batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, probabilities, image statistics) of image files or PNG bytes, through the model's decode path."""
    emb, probs, stats = [], [], []
    for start in range(0, len(sources), batch):
        x = np.stack([clf.load(s if isinstance(s, Path) else io.BytesIO(s)) for s in sources[start:start + batch]])
        _, p, e = clf.run_with_embedding(x)
        emb.append(e)
        probs.append(p)
        stats.append(drift.image_statistics(x))
    return np.concatenate(emb), np.concatenate(probs), np.concatenate(stats)


def draw(rng: np.random.Generator, pool: int, count: int) -> np.ndarray:
    """`count` indices into a pool: whole random permutations one after another, so a window of consecutive
    requests holds distinct images (traffic does not repeat an image; drawing with replacement would put duplicates
    in a window, which KS reads as lumps in the distribution: more rejections than alpha)."""
    return np.concatenate([rng.permutation(pool) for _ in range(-(-count // pool))])[:count]


def window_false_alarms(ref: drift.Reference, pool: tuple, args, rng) -> dict:
    """Single tests on random clean windows (without replacement): the fraction that rejects, at each alpha."""
    tests = [compare(ref, pool, rng.choice(len(pool[0]), args.window, replace=False), args.alpha)
             for _ in range(args.windows)]
    combined = np.array([t.pvalues["combined"] for t in tests])
    by_detector = {k: float(np.mean([t.pvalues[k] < args.alpha / len(ref.detectors) for t in tests]))
                   for k in ref.detectors}
    return {"windows": args.windows, "window": args.window,
            "rejected": {str(a): float((combined < a).mean()) for a in sorted({args.alpha, 0.01, 0.05})},
            "rejected_by_detector": by_detector}


def rows(pool: tuple, idx) -> tuple:
    """The rows `idx` of a pool (embeddings, probabilities, image statistics)."""
    return tuple(a[idx] for a in pool)


def feed(s: drift.Stream, pool: tuple, i: int) -> bool:
    """One request's row (its image statistics computed already, from the same tensor the server has)."""
    emb, probs, stats = rows(pool, slice(i, i + 1))
    return s.add(emb, probs, statistics=stats)


def compare(ref: drift.Reference, pool: tuple, idx, alpha: float) -> drift.Comparison:
    emb, probs, stats = rows(pool, idx)
    return drift.compare(ref, emb, probs, alpha, stats)


def stream(ref: drift.Reference, args) -> drift.Stream:
    return drift.Stream(ref, args.window, args.every, args.alpha, args.consecutive)


def clean_streams(ref: drift.Reference, pool: tuple, args, rng) -> dict:
    """Long clean streams (one image per request): tests, rejections, alarms; the expected run length without an
    alarm (ARL0) is requests / alarms (with none seen: over requests / 3, the one-sided 95% bound)."""
    requests = tests = rejected = alarms = 0
    first: list[int] = []
    by_detector = dict.fromkeys(ref.detectors, 0)
    for _ in range(args.streams):
        s = stream(ref, args)
        order = draw(rng, len(pool[0]), args.stream_rows)
        seen_alarm = False
        for i in order:
            if feed(s, pool, i):
                outcome = s.test()
                rejected += outcome.result.reject
                for k in by_detector:  # which detector's own p-value was below its share of alpha
                    by_detector[k] += bool(outcome.result.pvalues[k] < args.alpha / len(ref.detectors))
                if outcome.alarm and not seen_alarm:
                    first.append(s.seen)
                    seen_alarm = True
        requests, tests, alarms = requests + s.seen, tests + s.tests, alarms + s.alarms
    arl0 = requests / alarms if alarms else None
    return {"streams": args.streams, "requests": requests, "tests": tests, "rejected_tests": rejected,
            "rejection_rate": rejected / tests, "rejected_tests_by_detector": by_detector, "alarms": alarms,
            "arl0_requests": arl0, "arl0_lower_95": None if alarms else requests / 3, "first_alarm_at": first,
            # how strongly overlapping windows tie tests together: alarms per rejection (k = 2: the chance that the
            # test after a rejection rejects too; independent tests would give alpha)
            "alarms_per_rejection": alarms / rejected if rejected else None}


def until_alarm(ref: drift.Reference, clean: tuple, shifted: tuple, args, rng, limit: int = 500) -> int | None:
    """Shifted requests sent until the alarm, after a clean window (a random phase of the schedule); None: no alarm
    within `limit`."""
    s = stream(ref, args)
    for i in draw(rng, len(clean[0]), args.window + int(rng.integers(0, args.every))):
        if feed(s, clean, i):
            s.test()
    if s.detected:
        return 0  # a false alarm before the shift: counted as detected at once (rare; reported in the JSON)
    for n, i in enumerate(draw(rng, len(shifted[0]), limit), start=1):
        if feed(s, shifted, i) and s.test().alarm:
            return n
    return None


def detection(ref: drift.Reference, clean: tuple, shifted: tuple, args, rng) -> dict:
    found = [until_alarm(ref, clean, shifted, args, rng) for _ in range(args.trials)]
    hits = np.array([f for f in found if f is not None])
    within = float(np.mean([f is not None and f <= 100 for f in found]))
    windows = [compare(ref, shifted, i, args.alpha).pvalues
               for i in (rng.choice(len(shifted[0]), args.window, replace=False) for _ in range(100))]
    return {"trials": args.trials, "detected_within_100": within, "detected_within_500": len(hits) / len(found),
            "requests_median": float(np.median(hits)) if len(hits) else None,
            "requests_p90": float(np.percentile(hits, 90)) if len(hits) else None,
            "alarm_before_shift": int(sum(f == 0 for f in found)),
            "full_window_pvalues": {k: float(np.median([w[k] for w in windows])) for k in windows[0]},
            "full_windows_rejected": float(np.mean([w["combined"] < args.alpha for w in windows]))}


SWEEP = ((0.01, 2), (0.002, 3), (0.05, 3))  # besides the defaults: faster alarms but more false ones, or fewer
SWEEP_SHIFTS = ("brightness x0.8", "gaussian blur (sigma 1)")  # the two the defaults detect slowest


def sweep(ref: drift.Reference, clean: tuple, pools: dict, args, rng) -> list[dict]:
    """Other (alpha, k) settings: the expected run length without drift against the speed of detection."""
    rows = []
    for alpha, k in SWEEP:
        a = argparse.Namespace(**{**vars(args), "alpha": alpha, "consecutive": k, "trials": min(args.trials, 100)})
        log.info("sweep: alpha %g, %d in a row", alpha, k)
        cs = clean_streams(ref, clean, a, rng)
        rows.append({"alpha": alpha, "consecutive": k, "alarms": cs["alarms"], "requests": cs["requests"],
                     "arl0_requests": cs["arl0_requests"], "arl0_lower_95": cs["arl0_lower_95"],
                     "rejection_rate": cs["rejection_rate"],
                     "shifts": {s: {key: v for key, v in detection(ref, clean, pool, a, rng).items()
                                    if key in ("detected_within_100", "requests_median", "trials")}
                                for s, pool in pools.items()}})
    return rows


def test_cost(ref: drift.Reference, pool: tuple, images: dict[int, np.ndarray], args, rng, n: int = 300) -> dict:
    """What a test costs in the server's test thread: a `Stream` fed the model's input images (not their statistics),
    so each test computes the statistics of the `every` new images (`Window.measure`) and runs `compare`; and the
    image statistics alone, per image, as `image_statistics` on one (3, S, S) image."""
    s = stream(ref, args)
    keys = list(images)
    seconds = []
    while len(seconds) < n:
        i = keys[int(rng.integers(len(keys)))]
        if s.add(pool[0][i:i + 1], pool[1][i:i + 1], images[i][None]):
            seconds.append(s.test().result.seconds)
    ms = np.array(seconds) * 1000
    one = images[keys[0]][None]
    t0 = time.perf_counter()
    for _ in range(200):
        drift.image_statistics(one)
    per_image = (time.perf_counter() - t0) / 200 * 1000
    return {"tests": n, "window": args.window, "every": args.every, "mean_ms": float(ms.mean()),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "components": len(ref.basis), "detectors": list(ref.detectors), "image_statistics_ms_per_image": per_image}


def mono_reference(clf: OnnxClassifier, manifest, images: Path, components: int, with_image: bool
                   ) -> drift.Reference:
    """The reference of a deployment that only saw mono cells: the export's recipe on the mono cells."""
    mono = manifest[manifest["type"] == "mono"]
    fit = [images / p for p in mono[mono["split"] == "train"]["path"]]
    ref = [images / p for p in mono[mono["split"] == "val"]["path"]]
    log.info("mono reference: PCA on %d mono training cells, %d mono validation cells", len(fit), len(ref))
    emb, probs, stats = outputs(clf, ref)
    return drift.Reference.build(outputs(clf, fit)[0], emb, probs, components,
                                 {"fit_split": "train (mono)", "n_fit": len(fit), "reference_split": "val (mono)"},
                                 stats if with_image else None)


def throughput(model: Path, image: np.ndarray, args, arms: dict[str, tuple[Path, list[str]]] | None = None) -> dict:
    """The real server, monitoring off and on alternately (`--rounds` times each), 8 clients, binary tensors; besides
    requests/s, the server's own CPU time per request over the measured seconds (/proc: steadier than requests/s on
    a machine others share, whose load moves requests/s by more than the difference measured)."""
    on = ["--drift", "--drift-window", str(args.window), "--drift-every", str(args.every)]
    arms = arms or {"off": (model, ["--no-drift"]), "on": (model, on)}
    body, headers = binary_infer_body(image)
    runs: dict[str, list] = {label: [] for label in arms}
    server_cost: dict[str, dict | None] = dict.fromkeys(arms)
    for label in [label for _ in range(args.rounds) for label in arms]:
        path, flags = arms[label]
        with ServerProcess(path, "--poll-s", "0", "--no-access-log", *flags, name=NAME) as server:
            server.wait_ready(300)
            r = asyncio.run(run_load("127.0.0.1", server.port, f"/v2/models/{NAME}/infer", body, headers,
                                     args.clients, args.seconds, warmup_s=2.0,
                                     during=server_cpu(server.proc.pid, 2.0, args.seconds)))
            server_cost[label] = drift_cost(server.url) or server_cost[label]
            server.stop()
        server.cleanup()
        cpu_ms = 1000 * r["side"] / r["requests"] if r["side"] is not None and r["requests"] else None
        log.info("monitoring %s: %.1f requests/s, p99 %.1f ms, server CPU %.2f ms a request", label,
                 r["requests_per_s"], r["p99_ms"], cpu_ms or float("nan"))
        runs[label].append({**{k: r[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "errors", "requests")},
                            "server_cpu_ms_per_request": cpu_ms})
    mean = {k: float(np.mean([r["requests_per_s"] for r in v])) for k, v in runs.items()}
    cpu = {k: float(np.mean([r["server_cpu_ms_per_request"] for r in v])) if all(
        r["server_cpu_ms_per_request"] for r in v) else None for k, v in runs.items()}
    out = {"clients": args.clients, "seconds": args.seconds, "rounds": args.rounds, "runs": runs,
           "requests_per_s": mean, "server_cpu_ms_per_request": cpu}
    if set(arms) == {"off", "on"}:
        out.update(ratio_on_off=mean["on"] / mean["off"], server_test_cost=server_cost["on"],
                   cpu_ratio_on_off=cpu["on"] / cpu["off"] if cpu["on"] and cpu["off"] else None)
    else:
        out["server_test_cost"] = server_cost
    return out


def server_cpu(pid: int, warmup_s: float, seconds: float):
    """For run_load's `during`: the server process's CPU seconds (user + system, all threads) over the measured part
    of a run; None where /proc cannot tell."""
    def cpu() -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    async def during(started: float) -> float | None:
        await asyncio.sleep(max(0.0, started + warmup_s - time.perf_counter()))
        c0 = cpu()
        await asyncio.sleep(max(0.0, started + warmup_s + seconds - time.perf_counter()))
        c1 = cpu()
        return None if c0 is None or c1 is None else c1 - c0

    return during


def drift_cost(url: str) -> dict | None:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("drift_test_duration_seconds_sum", "drift_test_duration_seconds_count"))}
    n = values.get("drift_test_duration_seconds_count", 0)
    return {"tests": int(n), "mean_ms": 1000 * values["drift_test_duration_seconds_sum"] / n} if n else None


def measure(args) -> dict:
    rng = np.random.default_rng(args.seed)
    clf = OnnxClassifier(args.model)
    ref = drift.reference_of(args.model, read_metadata(args.model))
    manifest = read_manifest(args.manifest)
    test = manifest[manifest["split"] == "test"]
    files = [args.images / p for p in test["path"]]
    t0 = time.time()
    log.info("model outputs on %d clean test cells", len(files))
    clean = outputs(clf, files)
    out = {"model": str(args.model), "reference": {"n": len(ref.embedding), "components": len(ref.basis),
                                                   "detectors": list(ref.detectors), **ref.info},
           "settings": {k: getattr(args, k) for k in ("window", "every", "alpha", "consecutive")},
           "test_images": len(files)}
    out["false_alarms"] = window_false_alarms(ref, clean, args, rng)
    out["clean_streams"] = clean_streams(ref, clean, args, rng)
    some = rng.choice(len(files), min(len(files), 2 * args.window), replace=False)
    out["cost"] = test_cost(ref, clean, {int(i): clf.load(files[i]) for i in some}, args, rng)
    out["shifts"], shifted_pools = {}, {}
    for shift in SHIFTS:
        log.info("planted shift: %s", shift)
        shifted_pools[shift] = outputs(clf, [shifted_png(f, shift, rng) for f in files])
        out["shifts"][shift] = detection(ref, clean, shifted_pools[shift], args, rng)
    mono = test["type"].to_numpy() == "mono"
    mono_ref = mono_reference(clf, manifest, args.images, ref.basis.shape[0], ref.image is not None)
    mono_clean, poly = rows(clean, mono), rows(clean, ~mono)
    out["shifts"]["mono -> poly (natural)"] = detection(mono_ref, mono_clean, poly, args, rng)
    out["mono_reference"] = {"n": len(mono_ref.embedding), "false_alarms": window_false_alarms(
        mono_ref, mono_clean, argparse.Namespace(**{**vars(args), "windows": min(args.windows, 300)}), rng)}
    if not args.skip_sweep:
        out["sweep"] = sweep(ref, clean, {s: shifted_pools[s] for s in SWEEP_SHIFTS}, args, rng)
    out["outputs_seconds"] = round(time.time() - t0, 1)
    if not args.skip_throughput:
        out["throughput"] = throughput(args.model, clf.load(files[0])[None], args)
    return out


def print_table(out: dict) -> None:
    s = out["settings"]
    fa, cs, cost = out["false_alarms"], out["clean_streams"], out["cost"]
    print(f"\nDrift monitoring on ELPV ({out['test_images']} test cells; reference: {out['reference']['n']} "
          f"{out['reference'].get('reference_split')} cells, {out['reference']['components']} components); window "
          f"{s['window']}, a test every {s['every']}, alpha {s['alpha']}, {s['consecutive']} rejections in a row\n")
    print("| traffic | detected within 100 requests | requests until the alarm (median / p90) | median p-values of a "
          "whole shifted window (embedding / softmax / image) |")
    print("| --- | --- | --- | --- |")
    for name, d in out["shifts"].items():
        p = d["full_window_pvalues"]
        med = "-" if d["requests_median"] is None else f"{d['requests_median']:.0f} / {d['requests_p90']:.0f}"
        image = f"{p['image']:.1e}" if "image" in p else "-"
        print(f"| {name} | {100 * d['detected_within_100']:.1f}% of {d['trials']} | {med} | "
              f"{p['embedding']:.1e} / {p['softmax']:.1e} / {image} |")
    rates = ", ".join(f"{100 * v:.1f}% at alpha {a}" for a, v in fa["rejected"].items())
    arl = (f"{cs['arl0_requests']:.0f} requests" if cs["arl0_requests"] else
           f"no alarm in {cs['requests']} requests (ARL0 > {cs['arl0_lower_95']:.0f}, 95%)")
    print(f"| clean test windows: single tests rejecting | {rates} ({fa['windows']} windows) | | |")
    print(f"| clean streams: tests rejecting, alarms, ARL0 | {100 * cs['rejection_rate']:.2f}% of {cs['tests']} tests, "
          f"{cs['alarms']} alarms | {arl} | |")
    mfa = ", ".join(f"{100 * v:.1f}% at {a}" for a, v in out["mono_reference"]["false_alarms"]["rejected"].items())
    print(f"| mono reference, clean mono windows rejecting | {mfa} | | |")
    measured = f", image statistics of {cost['every']} new images included" if "image" in cost["detectors"] else ""
    print(f"| cost of one test (in-process{measured}) | mean "
          f"{cost['mean_ms']:.2f} ms, p99 {cost['p99_ms']:.2f} ms | image statistics: "
          f"{cost['image_statistics_ms_per_image']:.3f} ms an image | |")
    print("\n| alpha, rejections in a row | alarms in clean streams | ARL0 (requests) | "
          + " | ".join(f"{s}: within 100, median" for s in SWEEP_SHIFTS) + " |")
    print("| --- | --- | --- |" + " --- |" * len(SWEEP_SHIFTS))
    default = {"alpha": s["alpha"], "consecutive": s["consecutive"], "alarms": cs["alarms"], "requests": cs["requests"],
               "arl0_requests": cs["arl0_requests"], "arl0_lower_95": cs["arl0_lower_95"], "shifts": out["shifts"]}
    for row in [default, *out.get("sweep", [])]:
        arl = f"{row['arl0_requests']:.0f}" if row["arl0_requests"] else f"> {row['arl0_lower_95']:.0f}"
        print(f"| {row['alpha']}, {row['consecutive']} | {row['alarms']} in {row['requests']} | {arl} | " + " | ".join(
            f"{100 * row['shifts'][x]['detected_within_100']:.0f}%, {row['shifts'][x]['requests_median']}"
            for x in SWEEP_SHIFTS) + " |")
    if "throughput" in out:
        t = out["throughput"]
        sc = t["server_test_cost"]
        print(f"| server throughput, monitoring on / off | {t['requests_per_s']['on']:.1f} / "
              f"{t['requests_per_s']['off']:.1f} req/s = {t['ratio_on_off']:.3f} | {t['clients']} clients, binary "
              f"tensors | test cost in the server: {sc['mean_ms']:.2f} ms over {sc['tests']} tests |"
              if sc else f"| server throughput on / off | ratio {t['ratio_on_off']:.3f} | | |")
        c = t.get("server_cpu_ms_per_request") or {}
        if c.get("on") and c.get("off"):
            print(f"| server CPU per request, monitoring on / off | {c['on']:.2f} / {c['off']:.2f} ms = "
                  f"{t['cpu_ratio_on_off']:.3f} | | |")


def main(argv: list[str] | None = None) -> dict:
    d = DriftSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "model.onnx")
    p.add_argument("--manifest", type=Path, default=REPO / "data" / "validated.csv")
    p.add_argument("--images", type=Path, default=REPO / "data" / "images")
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--every", type=int, default=d.every)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--consecutive", type=int, default=d.consecutive)
    p.add_argument("--windows", type=int, default=1000, help="clean windows for the single-test false-alarm rate")
    p.add_argument("--streams", type=int, default=10, help="clean streams for the expected run length")
    p.add_argument("--stream-rows", type=int, default=20_000, help="requests per clean stream")
    p.add_argument("--trials", type=int, default=200, help="trials per shift")
    p.add_argument("--seconds", type=float, default=8.0, help="load per throughput run (2 x --rounds runs)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="throughput runs of each setting (off, on), alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-sweep", action="store_true", help="only the default settings (alpha, consecutive)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "drift.json")
    args = p.parse_args(argv)
    setup_logging()
    if not args.model.is_file() or drift.METADATA_KEY not in read_metadata(args.model):
        raise SystemExit(f"{args.model}: no exported model with a drift reference; run the pipeline (make run), or "
                         "export the checkpoint again (finetune stage export)")
    load_before = os.getloadavg()
    t0 = time.time()
    out = measure(args)
    out["seconds"] = round(time.time() - t0, 1)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python bench/bench_drift.py", *given])
    out = {**provenance(REPO, command, load_before=load_before), **out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    print_table(out)
    print(f"\n{args.out} ({out['seconds']:.0f} s)\n" + json.dumps(out["machine"]))
    return out


if __name__ == "__main__":
    main()
