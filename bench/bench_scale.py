"""Training memory against data size: images in RAM vs the decoded-image store on disk (issue 15).

For each size (default 2,000 and 20,000; `--with-100k` adds 100,000) it generates that many 64 px PNGs
in 4 classes, ingests them (`finetune stage ingest`, folder source), and trains twice with the same
params and seed, `train.data_store`/`train.feature_store` = ram, then disk, each run a separate
`python -m tasks.train` under `/usr/bin/time -v`: peak RSS is measured from outside the process
(Maximum resident set size). The disk run builds the store first (its wall time includes that); the
table also shows the weights' equality between the two runs.

    .venv/bin/python bench/bench_scale.py --sizes 2000          # ~10 min on 2 busy cores
    .venv/bin/python bench/bench_scale.py                       # 2,000 and 20,000
    .venv/bin/python bench/bench_scale.py --with-100k           # adds 100,000 (48 min for all three on 2 loaded cores; ~2 GB of PNGs)
    .venv/bin/python bench/bench_scale.py --data-only --with-100k   # ingest and validate only (minutes)

Ingest and validation run under `/usr/bin/time -v` too, so each stage's wall time, images/s and peak RSS
are in the results. Prints tables and writes bench/results/scale.json (with --data-only:
bench/results/scale_data.json, so a data-only run never replaces the training numbers). Work folders go
under --workdir (kept with --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import provenance  # noqa: E402

CLASSES = ("a", "b", "c", "d")
SETTINGS = [
    "data.source=folder", "data.path=raw", "data.split.stratify_by=[]", "data.split.test=0.1", "data.split.val=0.1",
    "data.orientation_invariant=true", "data.workers=2", "train.image_size=64", "train.cpu_image_size=64",
    "train.batch_size=32", "train.threads=2", "train.stages.0.epochs=1", "train.stages.1.epochs=1",
]


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHONPATH=str(REPO),
                DVC_NO_ANALYTICS="1", FINETUNE_CACHE_DIR="")


def generate(root: Path, n: int, size: int = 64, workers: int = 2) -> None:
    """n noisy grayscale PNGs in 4 classes told apart by brightness (learnable, orientation-free)."""
    def one(i: int) -> None:
        k = i % len(CLASSES)
        rng = np.random.default_rng(i)
        arr = np.clip(rng.normal(40 + 50 * k, 30, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").save(root / CLASSES[k] / f"{i:07d}.png", compress_level=1)

    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """`cmd` under /usr/bin/time -v: the finished process, its wall seconds and its peak RSS in MB (from outside)."""
    t0 = time.perf_counter()
    proc = run(["/usr/bin/time", "-v", *cmd], cwd)
    wall = time.perf_counter() - t0
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return proc, wall, rss_kb / 1024


def timed_stage(stage: str, project: Path, n: int) -> dict:
    _, wall, rss_mb = timed([sys.executable, "-m", "finetune", "stage", stage], project)
    return {"wall_s": round(wall, 1), "images_per_s": round(n / wall, 1), "peak_rss_mb": round(rss_mb, 1)}


def timed_train(project: Path, store: str) -> dict:
    """One training process under /usr/bin/time -v: wall, peak RSS (from outside), images/s from its history."""
    from tasks.params import write_overrides

    params = project / f"{store}.yaml"
    params.write_text((project / "params.yaml").read_text())
    write_overrides(params, [f"train.data_store={store}", f"train.feature_store={store}"])
    out = project / "out" / store
    cmd = [sys.executable, "-m", "tasks.train", "--params", str(params), "--manifest",
           "data/manifest.csv", "--checkpoint", str(out / "model.pt"), "--metrics", str(out / "summary.json"),
           "--history", str(out / "history.csv"), "--state", str(out / "state.pt"), "--no-resume"]
    proc, wall, rss_mb = timed(cmd, project)
    summary = json.loads((out / "summary.json").read_text())
    import pandas as pd

    history = pd.read_csv(out / "history.csv")
    estimate = next((line.split("train: ", 2)[-1] for line in proc.stderr.splitlines() if "memory budget" in line), "")
    return {"store": store, "wall_s": round(wall, 1), "train_wall_s": summary["wall_time_s"], "estimate": estimate,
            "peak_rss_mb": round(rss_mb, 1), "images_per_s": round(float(history["images_per_s"].mean()), 1),
            "n_train": summary["n_train"], "n_val": summary["n_val"],
            "placed": [summary["data_store"], summary["feature_store"]]}


def same_weights(a: Path, b: Path) -> bool:
    import torch

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def bench_size(n: int, workdir: Path, base: Path | None, train: bool = True) -> tuple[dict, Path | None]:
    from tasks.params import write_overrides

    project = workdir / f"n{n}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    t0 = time.perf_counter()
    generate(project / "raw", n)
    gen_s = time.perf_counter() - t0
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_overrides(project / "params.yaml", SETTINGS)
    stages = {stage: timed_stage(stage, project, n) for stage in ("ingest", "validate")}
    data = {"images": n, "generate_s": round(gen_s, 1), "ingest_s": stages["ingest"]["wall_s"], "stages": stages}
    if not train:
        return data, base
    if base is None:
        run([sys.executable, "-m", "finetune", "stage", "fetch-model"], project)
        base = project / "models" / "base"
    else:
        shutil.copytree(base, project / "models" / "base")
    runs = [timed_train(project, store) for store in ("ram", "disk")]
    store_mb = sum(f.stat().st_size for f in (project / ".finetune" / "cache").rglob("images.u8")) / 2**20
    result = {**data, "runs": runs, "store_mb": round(store_mb, 1),
              "weights_equal": same_weights(project / "out" / "ram" / "model.pt", project / "out" / "disk" / "model.pt")}
    return result, base


def projection(project: Path, n: int, stages: str) -> dict:
    """PROJECTED (not measured): the budget's estimate for `n` images with this bench's params (`bench`) or the
    default recipe's 2 + 8 epochs (`default`), plus the in-memory manifest scaled from the measured one."""
    import pandas as pd
    import torch

    from tasks import backbones
    from tasks.params import TrainParams, load_params
    from tasks.train.budget import plan

    p = load_params(project / "params.yaml").train.model_copy(update={"augment": ["hflip", "vflip", "rot90"],
                                                                      "memory_budget_mb": 10**9})
    if stages == "default":
        p = p.model_copy(update={"stages": TrainParams().stages})
    meta = json.loads((project / "models" / "base" / "meta.json").read_text())
    model = backbones.build(meta)
    backbones.with_new_head(model, len(CLASSES), 0)
    manifest = pd.read_csv(project / "data" / "manifest.csv", dtype=str, keep_default_na=False)
    per_row = manifest.memory_usage(deep=True).sum() / len(manifest)
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    with torch.no_grad():
        need = plan(model, p, 64, n_train, n_val, project).need
    return {"images": n, "stages": stages, "n_train": n_train, "n_val": n_val,
            "estimate_mb": {k: round(v / 2**20, 1) for k, v in need.items() if k != "process now"},
            "manifest_table_mb": round(float(per_row) * n / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--with-100k", action="store_true", help="add 100,000 images (~48 min for 2k+20k+100k on 2 loaded cores)")
    ap.add_argument("--workdir", type=Path, default=None, help="where projects are generated (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated projects")
    ap.add_argument("--data-only", action="store_true", help="ingest and validate only (no training)")
    ap.add_argument("--out", default=None, help="JSON file (default: bench/results/scale.json, or scale_data.json "
                    "with --data-only)")
    args = ap.parse_args()
    load = os.getloadavg()
    out = Path(args.out or REPO / "bench" / "results" / ("scale_data.json" if args.data_only else "scale.json"))
    sizes = sorted(set(args.sizes) | ({100_000} if args.with_100k else set()))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results, base, projections = [], None, []
    try:
        for n in sizes:
            result, base = bench_size(n, workdir, base, train=not args.data_only)
            results.append(result)
            if args.data_only:
                continue
            if n == sizes[-1]:
                projections = [projection(workdir / f"n{n}", 1_000_000, s) for s in ("bench", "default")]
            if base.is_relative_to(workdir / f"n{n}"):  # keep the weights for the next size
                kept = workdir / "base"
                shutil.copytree(base, kept, dirs_exist_ok=True)
                base = kept
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    command = " ".join([".venv/bin/python bench/bench_scale.py", *sys.argv[1:]])
    report = {**provenance(REPO, command, load_before=load), "results": results, "settings": SETTINGS,
              "projected_1m": projections}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| images | stage | wall s | images/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        for stage, t in r["stages"].items():
            print(f"| {r['images']:,} | {stage} | {t['wall_s']} | {t['images_per_s']} | {t['peak_rss_mb']} |")
    if args.data_only:
        return 0
    print("\n| images | store | wall s | train s | images/s | peak RSS MB | placed (images, features) | weights equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for t in r["runs"]:
            print(f"| {r['images']:,} | {t['store']} | {t['wall_s']} | {t['train_wall_s']} | {t['images_per_s']} | "
                  f"{t['peak_rss_mb']} | {', '.join(t['placed'])} | {r['weights_equal']} |")
    for p in projections:
        print(f"PROJECTED, not measured: 1,000,000 images, {p['stages']} stages: " + ", ".join(
            f"{k} {v:,.0f} MB" for k, v in p["estimate_mb"].items()) + f", manifest table {p['manifest_table_mb']:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
