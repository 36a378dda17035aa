"""Files every stage writes: atomic, durable replaces; JSON; sha256.

Every artifact is written to a temp file beside its destination, flushed to disk (`fsync`),
renamed over the destination, and the folder entry is flushed too. A reader sees the old file
or the new one, never half of one, and a power loss cannot leave an empty file behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tasks.crashpoints import crash_point


def _read_umask() -> int:
    """The process umask, read once at import (before worker threads exist): `os.umask` can only be
    read by setting it, which would race with threads that create files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is flushed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@functools.lru_cache(maxsize=256)
def scratch_dir(folder: Path) -> Path:
    """Where temp files for `folder` go: the DVC project's `.dvc/tmp/finetune` when `folder` is inside a project
    (on the same filesystem, so the final rename stays atomic), else `folder` itself. Temps then never sit in
    the workspace, even when a killed stage is later restored from DVC's run cache instead of run again."""
    for parent in (folder, *folder.parents):
        if (parent / ".dvc").is_dir():
            scratch = parent / ".dvc" / "tmp" / "finetune"
            try:
                scratch.mkdir(parents=True, exist_ok=True)
                if os.stat(scratch).st_dev == os.stat(folder).st_dev:
                    return scratch
            except OSError:
                pass
            break
    return folder


def sweep_temps(folder: Path) -> None:
    """Remove the temp files and folders killed writers left in `folder` (`.<name>.<pid>.<random>.tmp` whose
    process is gone); a live writer's temps are left alone."""
    for stale in folder.glob(".*.tmp"):
        parts = stale.name.split(".")
        pid = parts[-3] if len(parts) >= 4 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def new_temp(path: str | Path, directory: bool = False) -> Path:
    """A fresh temp file (or folder) for writing `path`, named for this process, in `path`'s scratch folder;
    stale temps there are swept first."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = scratch_dir(path.parent)
    sweep_temps(folder)
    prefix = f".{path.name}.{os.getpid()}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; flush it and rename it over `path` only if the block succeeds.

    Readers never see a half-written artifact and a failure leaves the previous file intact.
    """
    path = Path(path)
    tmp_path = new_temp(path)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp makes 0600; artifacts get normal permissions
        fsync_file(tmp_path)
        crash_point(f"write:{path.name}")
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path, first_wins: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder to build `path` in; when the block succeeds, swap it in whole.

    Readers see the old folder or the new one, never a half-built one; a failure (or a kill: temps live in the
    scratch folder and are swept by the next writer) leaves the old folder as it was. `first_wins`: when another
    process has put a complete `path` in place meanwhile (a cache both built), keep it instead of replacing it.
    """
    path = Path(path).absolute()
    tmp = new_temp(path, directory=True)
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it private; a built folder gets normal permissions
    old = None
    try:
        yield tmp
        fsync_dir(tmp)
        if first_wins:
            try:
                os.replace(tmp, path)  # refused onto a folder that is not empty: the other writer's, complete
            except OSError:
                if not path.exists():
                    raise
        else:
            if path.exists():
                old = new_temp(path, directory=True)
                os.replace(path, old)  # onto the empty temp folder: one rename
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
