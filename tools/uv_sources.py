"""Print `uv pip install` options for the package sources pip is configured with (pip.conf, PIP_* variables).

`make setup` installs with uv, which reads neither: without these options it would fetch torch's CUDA build (~3 GB)
from PyPI instead of the wheels this machine keeps on disk, and ignore pip's version cap. Standard library only (it
runs before the virtual environment exists). Local sources that do not exist are left out (pip only warns; uv fails).
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def configured() -> list[tuple[str, str]]:
    """(option, value) pairs from `pip config list`, environment variables included, first seen first."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=False, capture_output=True,
                         text=True).stdout
    pairs = []
    for line in out.splitlines():
        key, _, raw = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in OPTIONS and raw:
            pairs += [(OPTIONS[name], value) for value in ast.literal_eval(raw).split()]
    return list(dict.fromkeys(pairs))


def exists(value: str) -> bool:
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        return True
    return os.path.exists(value)


if __name__ == "__main__":
    print(" ".join(f"{option} {shlex.quote(value)}" for option, value in configured() if exists(value)))
