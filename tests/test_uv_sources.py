"""`make setup` gives uv the package sources pip is configured with (tools/uv_sources.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_pip_sources_become_uv_options_and_missing_local_ones_are_left_out(tmp_path):
    wheels, constraints = tmp_path / "wheels", tmp_path / "constraints.txt"
    wheels.mkdir()
    constraints.write_text("torch<=2.14.1\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{tmp_path}/simple https://mirror.example/simple\n"
                    f"constraint = {constraints}\n")
    env = {**os.environ, "PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": str(wheels)}
    out = subprocess.run([sys.executable, str(REPO / "tools/uv_sources.py")], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    pairs = list(zip(out[::2], out[1::2]))
    assert ("--find-links", str(wheels)) in pairs and ("--constraint", str(constraints)) in pairs
    assert ("--extra-index-url", "https://mirror.example/simple") in pairs
    assert not any(value == f"file://{tmp_path}/simple" for _, value in pairs)  # no such folder: uv would fail on it
