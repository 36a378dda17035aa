"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path) -> str | None:
    """HEAD's commit, with '+dirty' when tracked files differ from it (None outside git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def stamp(repo: Path) -> dict:
    """When and from which commit a number was measured (report.py prints both beside it)."""
    import datetime

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(repo)}


def provenance(repo: Path, command: str, threads: int | None = None, load_before=None) -> dict:
    """Where a number comes from: the command, the date (UTC), the commit and the machine."""
    import os

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    if threads is not None:
        machine["threads"] = threads
    if load_before is not None:
        machine["loadavg_before"] = [round(x, 2) for x in load_before]
        machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"command": command, **stamp(repo), "machine": machine}


def ensure_pipeline_inputs(repo: Path, params_file: Path, log) -> None:
    """data/validated.csv, data/images and models/base, created with `finetune stage ...` when missing."""
    import subprocess
    import sys

    for stage, needed in (("ingest", repo / "data/manifest.csv"), ("validate", repo / "data/validated.csv"),
                          ("fetch-model", repo / "models/base/meta.json")):
        if not needed.exists():
            log.info("creating %s: finetune stage %s", needed.relative_to(repo), stage)
            subprocess.run([sys.executable, "-m", "finetune", "stage", stage, "--params", str(params_file)],
                           cwd=repo, check=True)
