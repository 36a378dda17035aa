"""`dvc repro` with nothing changed: how long until DVC says every stage is up to date (target: under 2 s).

Measures in the project itself when it has been run (`make run` leaves `dvc.lock`), otherwise in a tiny
generated project built the way the end-to-end tests build theirs (first `dvc repro` not timed). Each
no-op repro runs `--repeats` times; the table shows min / median / max.

    .venv/bin/python bench/bench_repro.py                 # the project, or a tiny one
    .venv/bin/python bench/bench_repro.py --tiny          # always the tiny generated project

Prints a table and writes bench/results/bench_repro.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import cpu_name  # noqa: E402


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], DVC_NO_ANALYTICS="1")


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          check=True)


def tiny_project(root: Path) -> Path:
    from tests.test_end_to_end import new_project

    project = new_project(root / "tiny")
    dvc("repro", cwd=project)
    return project


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="measure a tiny generated project even if this one has run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench/results/bench_repro.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-repro-") as tmp:
        use_repo = not args.tiny and (REPO / "dvc.lock").exists() and "up to date" in dvc("status", cwd=REPO).stdout
        project = REPO if use_repo else tiny_project(Path(tmp))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = dvc("repro", cwd=project).stdout
            times.append(time.perf_counter() - t0)
            if "Running stage" in out:
                raise SystemExit(f"a stage ran during a no-op repro:\n{out}")
    result = {"project": "this project (ELPV)" if use_repo else "tiny generated project", "repeats": args.repeats,
              "seconds": {"min": min(times), "median": statistics.median(times), "max": max(times)},
              "target_s": 2.0, "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                                           "load_avg": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    s = result["seconds"]
    print(f"| project | no-op `dvc repro` min | median | max | target |\n| --- | --- | --- | --- | --- |\n"
          f"| {result['project']} | {s['min']:.2f} s | {s['median']:.2f} s | {s['max']:.2f} s | < 2 s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
