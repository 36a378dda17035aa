"""Run lineage kept beside the model registry: which data, params, code and flow run made a version.

`<registry>/lineage/<version>.json` holds `{"version": ..., "runs": [record, ...]}`, oldest first,
one record per flow run that registered or re-promoted the version: the DVC hash of the data
dependency (what the retraining flow compares to decide whether the data changed since the
champion was trained), the params file's sha256, the git commit, and the flow run's id, name, URL
and deployment. A version folder is immutable, so lineage lives beside it rather than in it.
Writers take a lock; every write replaces the file atomically, so a reader never needs the lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock

from tasks.files import write_json
from tasks.registry import RegistryError, parse_version

FOLDER = "lineage"


def path_of(root: str | Path, version: str) -> Path:
    return Path(root) / FOLDER / f"{parse_version(version)}.json"


def read(root: str | Path, version: str) -> list[dict]:
    """The lineage records of `version`, oldest first ([] when it has none)."""
    path = path_of(root, version)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc}): remove it or restore it from a backup") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise RegistryError(f"{path} should hold {{'version': ..., 'runs': [...]}}")
    return runs


def latest(root: str | Path, version: str) -> dict | None:
    runs = read(root, version)
    return runs[-1] if runs else None


def record(root: str | Path, version: str, entry: dict) -> Path:
    """Append `entry` to `version`'s lineage (under the lineage lock); returns the file."""
    path = path_of(root, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / ".lock"), timeout=120):
        runs = read(root, version)
        write_json(path, {"version": parse_version(version), "runs": [*runs, entry]})
    return path
