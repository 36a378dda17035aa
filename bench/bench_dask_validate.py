"""`finetune validate` of a generated 20,000-image folder: one process (threads) vs Prefect's Dask task
runner on a local cluster of 1 and 2 worker processes.

The folder is generated once (grey 'cells' with smooth shading and noise, two classes, PNG) and kept
for reruns. Each run validates the whole folder the way `finetune validate PATH` does (list, split,
probe every image, Great Expectations suite); only the probing differs: ingest's thread pool in this
process, or the `probe-images` flow mapping chunks of `--chunk` images onto Dask workers (one thread
each). A real Prefect server is started for the Dask runs (task runs report to it). Every run's
validation results (minus timings) and manifest must equal the single-process run's.

    .venv/bin/python bench/bench_dask_validate.py                   # 20,000 images, Dask 1 and 2 workers
    .venv/bin/python bench/bench_dask_validate.py --images 2000     # a quick look

Prints a table (with the machine's load average, which matters on a shared 2-core machine) and
writes bench/results/dask_validate.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from common import cpu_name  # noqa: E402  (bench/ is on sys.path when run as a script)
from PIL import Image  # noqa: E402

from tasks.files import write_json  # noqa: E402
from tasks.params import ValidateParams  # noqa: E402


def generate(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """`folder/<class>/<i>.png`, n images in all; reused when it already holds them."""
    if len(list(folder.rglob("*.png"))) == n:
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = ("intact", "cracked")[i % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 1, (6, 6))
        shade = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))
        x = 70 + 0.43 * shade + rng.normal(0, 12, (size, size))
        if label == "cracked":
            pos = rng.integers(size // 8, size - size // 8)
            x[pos:pos + 2, :] -= 60
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "L").save(folder / label / f"{i:05d}.png")
    return folder


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(folder: Path, out: Path, workers: int, chunk: int) -> dict:
    """One `finetune validate`; `workers` 0 = ingest's threads in this process, else Dask workers."""
    from finetune.validate_any import validate_path
    from tasks.ingest import probe_all

    timed: dict[str, float] = {}

    def probe(sources, threads, max_pixels):
        start = time.perf_counter()
        if workers == 0:
            rows = probe_all(sources, threads, max_pixels)
        else:
            from flows.scale import probe_all as dask_probe_all

            rows = pd.DataFrame(dask_probe_all(sources, max_pixels, workers, chunk_size=chunk))
        timed["probe_s"] = time.perf_counter() - start
        return rows

    load_before = load()
    start = time.perf_counter()
    outcome = validate_path(folder, ValidateParams(), out, probe=probe)
    total = time.perf_counter() - start
    return {"runner": "threads (1 process)" if workers == 0 else f"dask, {workers} worker process(es)",
            "dask_workers": workers, "images": outcome.n_images, "passed": outcome.success,
            "probe_s": round(timed["probe_s"], 2), "total_s": round(total, 2), "load_before": load_before,
            "load_after": load()}


def comparable(out: Path) -> tuple[dict, bytes]:
    results = json.loads((out / "validation.json").read_text())
    return {k: v for k, v in results.items() if k not in ("time_s", "timings")}, (out / "manifest.csv").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=96, help="image side (px)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker processes to try")
    parser.add_argument("--chunk", type=int, default=500, help="images per Dask task")
    parser.add_argument("--folder", type=Path, default=REPO / "bench/results/dask-images",
                        help="where the generated images are kept")
    args = parser.parse_args()

    start = time.perf_counter()
    folder = generate(args.folder / f"{args.images}x{args.size}", args.images, args.size)
    print(f"{args.images} images of {args.size}x{args.size} px in {folder} ({time.perf_counter() - start:.0f} s)")

    from finetune.local_prefect import prefect_api

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp, prefect_api(Path(tmp)):
        baseline = run(folder, Path(tmp) / "threads", 0, args.chunk)
        rows.append({**baseline, "identical": True})
        expected = comparable(Path(tmp) / "threads")
        for workers in args.workers:
            out = Path(tmp) / f"dask{workers}"
            row = run(folder, out, workers, args.chunk)
            rows.append({**row, "identical": comparable(out) == expected})
    one = next((r for r in rows if r["dask_workers"] == 1), None)
    for r in rows:
        r["speedup_vs_threads"] = round(baseline["probe_s"] / r["probe_s"], 2)
        r["speedup_vs_dask1"] = round(one["probe_s"] / r["probe_s"], 2) if one else None

    print(f"\nfinetune validate, {args.images} images, chunks of {args.chunk}; {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"{'runner':34} {'probe s':>8} {'total s':>8} {'x threads':>9} {'x dask-1':>8}  identical  load before/after")
    for r in rows:
        print(f"{r['runner']:34} {r['probe_s']:8.1f} {r['total_s']:8.1f} {r['speedup_vs_threads']:9.2f} "
              f"{r['speedup_vs_dask1'] or 0:8.2f}  {str(r['identical']):9}  {r['load_before']} / {r['load_after']}")
    result = {"images": args.images, "size": args.size, "chunk": args.chunk, "cpu": cpu_name(),
              "cpus": os.cpu_count(), "rows": rows}
    write_json(REPO / "bench/results/dask_validate.json", result)
    print("\nbench/results/dask_validate.json")
    if not all(r["identical"] for r in rows):
        sys.exit("the Dask runs' results differ from the single-process run's")


if __name__ == "__main__":
    main()
