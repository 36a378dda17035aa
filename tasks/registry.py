"""A file-based model registry: numbered immutable versions and one `champion` alias.

Layout under the registry root (`registry.root`, default `registry/` in the project folder):

    versions/v0001/model.onnx          the exported model (uint8 input, metadata inside)
    versions/v0001/model.int8.onnx     the INT8 model, when export kept one
    versions/v0001/model_card.md
    versions/v0001/drift_reference.npz the drift reference the model's metadata names (and .int8.npz, the INT8 one's)
    versions/v0001/metadata.json       metrics, gate verdict, checkpoint and ONNX sha256, params hash,
                                       data version, git commit, created_at
    versions/v0001/predictions.csv     the model's per-image test predictions
    champion.json                      {"version": "v0001", "path": "versions/v0001/model.onnx",
                                        "history": [earlier champions, oldest first], "updated_at": ...}
    .lock                              the lock writers take (readers never need it)

A version folder is built in a staging folder and renamed into `versions/` in one step, so a
reader sees a version complete or not at all, and it is never changed afterwards. The alias is
replaced atomically (temp file + `os.replace`). Writers (register, promote, rollback) take an
exclusive file lock, so two concurrent promotions serialize and version numbers are never handed
out twice. Serving reads `champion.json`, then `versions/<version>/model.onnx`, with no lock.

On object storage the same layout works: version prefixes are write-once (create-only puts,
`If-None-Match: *` on `versions/vNNNN/metadata.json` allocates the number), and `champion.json` is
one small object replaced with a conditional put (`If-Match: <ETag read>`), which takes the place
of the lock: a promotion that lost the race re-reads the alias and retries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from tasks.crashpoints import crash_point
from tasks.files import fsync_dir, fsync_file, sha256_file, write_json

CHAMPION = "champion.json"
INT8_FILE = "model.int8.onnx"  # a version's INT8 model (export keeps one only within its accuracy tolerance)
VERSION_RE = re.compile(r"^v(\d{4,})$")
LOCK_TIMEOUT_S = 120


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message names the file or version and the fix."""


class DamagedAlias(RegistryError):
    """champion.json exists but cannot be used (not JSON, bad fields, or it names a missing version); the message
    says how to repair it: `finetune promote VERSION` rewrites the alias."""


def resolve_root(params_path: str | Path, root: str | Path) -> Path:
    """`registry.root` from a params file: relative to that file's folder (the project folder)."""
    return Path(root) if Path(root).is_absolute() else Path(params_path).parent / root


def version_name(number: int) -> str:
    return f"v{number:04d}"


def parse_version(text: str) -> str:
    """'3', 'v3', 'v0003' -> 'v0003'."""
    m = re.fullmatch(r"v?(\d{1,9})", str(text).strip())  # 9 digits: never a number Python refuses to parse
    if not m or int(m.group(1)) < 1:
        raise RegistryError(f"'{text}' is not a version: use a number such as 3, v3 or v0003")
    return version_name(int(m.group(1)))


def _lock(root: Path) -> FileLock:
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".lock"), timeout=LOCK_TIMEOUT_S)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The exclusive writer lock, with a clear error when another writer holds it too long."""
    lock = _lock(root)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(f"registry {root} is locked by another writer ({root / '.lock'}) for over "
                            f"{LOCK_TIMEOUT_S} s; try again") from None
    try:
        yield
    finally:
        lock.release()


def list_versions(root: str | Path) -> list[str]:
    """Registered versions, oldest first."""
    base = Path(root) / "versions"
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in base.iterdir() if (m := VERSION_RE.match(p.name)) and p.is_dir()]
    return [name for _, name in sorted(found)]


def version_dir(root: str | Path, version: str) -> Path:
    version = parse_version(version)
    path = Path(root) / "versions" / version
    if not path.is_dir():
        known = list_versions(root)
        raise RegistryError(f"registry {root} has no version {version} (versions: {', '.join(known) or 'none'})")
    return path


def read_metadata(root: str | Path, version: str) -> dict:
    path = version_dir(root, version) / "metadata.json"
    return _read_json(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path} is missing: the registry is damaged") from None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc}): the registry is damaged") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def read_champion(root: str | Path) -> dict | None:
    """The alias (`version`, `path`, `history`, `updated_at`), or None when nothing was promoted yet.
    `DamagedAlias` (saying how to repair it) when the file is unusable or names a missing version."""
    path = Path(root) / CHAMPION
    if not path.exists():
        return None
    try:
        data = _read_json(path)
    except RegistryError as exc:
        raise DamagedAlias(f"{exc}{repair_hint(root)}") from None
    version, history = data.get("version"), data.get("history", [])
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise DamagedAlias(f"{path}: 'version' should be a version name such as v0001, got {version!r}"
                           f"{repair_hint(root)}")
    for key in ("history", "rolled_back"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and VERSION_RE.match(v) for v in value):
            raise DamagedAlias(f"{path}: '{key}' should be a list of version names, got {value!r}{repair_hint(root)}")
    if not (Path(root) / "versions" / version).is_dir():
        raise DamagedAlias(f"{path} names version {version}, which is not in {Path(root) / 'versions'}"
                           f"{repair_hint(root)}")
    return {"version": version, "history": history, "rolled_back": data.get("rolled_back", []),
            **{k: v for k, v in data.items() if k not in ("version", "history", "rolled_back")}}


def repair_hint(root: str | Path) -> str:
    known = list_versions(root)
    return (f"; repair the alias with `finetune promote VERSION` (versions: {', '.join(known) or 'none'})"
            if known else "; no version is left to promote: register one (`finetune registry add MODEL.onnx`)")


def salvage_alias(root: str | Path) -> dict:
    """What a damaged alias still says that holds: its history and rolled-back marks, for versions that exist."""
    try:
        data = json.loads((Path(root) / CHAMPION).read_text())
    except (OSError, ValueError):
        data = {}
    existing = set(list_versions(root))

    def kept(key: str) -> list[str]:
        value = data.get(key) if isinstance(data, dict) else None
        return [v for v in value if isinstance(v, str) and v in existing] if isinstance(value, list) else []

    return {"version": None, "history": kept("history"), "rolled_back": kept("rolled_back")}


def rolled_back_checkpoints(root: str | Path) -> dict[str, str]:
    """{checkpoint sha256: version} of the versions a person rolled back (the pipeline must not bring them back)."""
    alias = read_champion(root)
    out = {}
    for version in (alias or {}).get("rolled_back", []):
        sha = read_metadata(root, version).get("checkpoint_sha256")
        if sha:
            out[sha] = version
    return out


def champion_model(root: str | Path) -> Path | None:
    """Path of the champion's ONNX model (what serving loads), or None without a champion."""
    champ = read_champion(root)
    return None if champ is None else Path(root) / "versions" / champ["version"] / "model.onnx"


def find_by_sha256(root: str | Path, onnx_sha256: str) -> str | None:
    for version in list_versions(root):
        meta_path = Path(root) / "versions" / version / "metadata.json"
        if meta_path.exists() and _read_json(meta_path).get("onnx_sha256") == onnx_sha256:
            return version
    return None


def register(root: str | Path, files: dict[str, Path], metadata: dict) -> tuple[str, bool]:
    """Add a version holding `files` (name in the version folder -> source path; `model.onnx` required)
    and `metadata.json`. The same ONNX file (sha256) is never registered twice: its existing version is
    returned with False. Returns (version, created)."""
    root = Path(root)
    if "model.onnx" not in files:
        raise RegistryError("a version needs a model.onnx")
    for name, src in files.items():
        if not Path(src).is_file():
            raise RegistryError(f"cannot register: {src} (for {name}) is not a file")
    onnx_sha = sha256_file(files["model.onnx"])
    with _locked(root):
        remove_stale_staging(root)
        existing = find_by_sha256(root, onnx_sha)
        if existing:
            return existing, False
        versions = list_versions(root)
        version = version_name(int(versions[-1][1:]) + 1 if versions else 1)
        (root / "versions").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=root))
        try:
            for name, src in files.items():
                shutil.copyfile(src, staging / name)
            meta = {"version": version, "created_at": _now(), **metadata, "onnx_sha256": onnx_sha,
                    "files": {name: sha256_file(staging / name) for name in files}}
            write_json(staging / "metadata.json", meta)
            os.chmod(staging, 0o755)
            for f in staging.iterdir():
                fsync_file(f)
            crash_point("registry:staged")
            os.rename(staging, root / "versions" / version)  # atomic: the version appears complete
            fsync_dir(root / "versions")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return version, True


def remove_stale_staging(root: Path) -> None:
    """Staging folders are made only under the writer lock: any found while holding it was left by a killed writer."""
    for stale in root.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


ANY = object()  # `promote(expected=ANY)`: whatever the current champion is


def promote(root: str | Path, version: str | None = None, reason: str = "",
            expected: str | None | object = ANY, by_hand: bool = False) -> tuple[dict, bool]:
    """Make `version` (default: the newest) the champion; the previous one goes onto the history.

    `expected`: the champion the caller judged against (None: no champion); if the alias names
    another version now, nothing changes and RegistryError says so (a conditional update).
    A rolled-back version is refused unless `by_hand` (a person's decision, which also clears the mark).
    A damaged alias (`DamagedAlias`) is repaired when no `expected` champion is given: the new alias keeps what
    still holds of the old one's history.
    Returns (the new alias, whether it changed). Promoting the current champion changes nothing."""
    root = Path(root)
    with _locked(root):
        versions = list_versions(root)
        if not versions:
            raise RegistryError(f"registry {root} has no versions to promote (run the pipeline, or `finetune registry "
                                "add MODEL.onnx`)")
        version = parse_version(version) if version is not None else versions[-1]
        version_dir(root, version)
        try:
            current = read_champion(root)
        except DamagedAlias:
            if expected is not ANY:  # a conditional promotion (the pipeline's) cannot know what it compared with
                raise
            current = salvage_alias(root)
        now = current["version"] if current else None
        if expected is not ANY and now != expected and now != version:
            raise RegistryError(f"the champion changed since the gate judged {version}: it compared against "
                                f"{expected or 'no champion'}, the champion is now {now or 'none'}; judge again "
                                "against the new champion (dvc repro -f -s gate), then promote")
        rolled_back = current["rolled_back"] if current else []
        if version in rolled_back and not by_hand:
            raise RegistryError(f"{version} was rolled back; only a person brings it back (finetune promote {version})")
        rolled_back = [v for v in rolled_back if v != version]
        if current and current["version"] == version:
            if rolled_back != current["rolled_back"]:
                return _write_alias(root, version, current["history"], reason, rolled_back), False
            return current, False
        if current and current["version"] is None:  # repairing: the history that still exists, without this one
            history = [v for v in current["history"] if v != version]
        else:
            history = (current["history"] + [current["version"]]) if current else []
        return _write_alias(root, version, history, reason or f"promoted {version}", rolled_back), True


def rollback(root: str | Path, reason: str = "") -> dict:
    """Move the alias back to the previous champion (the last entry of the history)."""
    root = Path(root)
    with _locked(root):
        current = read_champion(root)
        if current is None:
            raise RegistryError(f"registry {root} has no champion ({root / CHAMPION} does not exist): nothing to "
                                "roll back")
        if not current["history"]:
            raise RegistryError(f"champion {current['version']} is the first champion of registry {root}: there is "
                                "no previous champion to roll back to")
        previous = current["history"][-1]
        version_dir(root, previous)
        rolled_back = sorted(set(current["rolled_back"]) | {current["version"]})
        return _write_alias(root, previous, current["history"][:-1],
                            reason or f"rolled back from {current['version']} to {previous}", rolled_back)


def _write_alias(root: Path, version: str, history: list[str], reason: str, rolled_back: list[str]) -> dict:
    alias = {"version": version, "path": f"versions/{version}/model.onnx", "history": history,
             "rolled_back": rolled_back, "updated_at": _now(), "reason": reason}
    write_json(root / CHAMPION, alias)  # temp file + os.replace: readers see the old or the new alias
    return alias


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
