"""One run at a time per project folder, and params.yaml put back when a run fails.

A run (`finetune run`, a dashboard or API run on a worker, the scheduled retraining) holds the
project for its whole duration: an exclusive lock on `.finetune/run.lock`, taken before anything in
the folder is touched (before `--set` or form values are written into params.yaml) and released
when the run ends. DVC's own lock covers one `dvc repro` only, so without ours a second run could
rewrite params.yaml between the first run's stages and `dvc.lock` would record a mixture.

The lock is an OS file lock (`flock`): the kernel releases it when the holding process dies, so a
killed run never leaves a stale lock. Beside it, `.finetune/run.json` names the holder (flow run,
deployment, URL, pid, host, start time); a run that finds the project busy waits up to
`orchestration.lock_wait_s` saying whom it waits for, or is refused with that name, before it has
changed anything.

Overrides of a run that fails are taken out of params.yaml again (the file is restored byte for
byte, unless someone edited it meanwhile), and the failure message says so and names them: the
next plain `dvc repro` or `finetune run` does not silently repeat the failed run's settings.
"""

from __future__ import annotations

import json
import os
import re
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from tasks.files import atomic_write, write_json
from tasks.params import Params, ParamsChange, load_params, prepare_change

LOCK = Path(".finetune") / "run.lock"
HOLDER = Path(".finetune") / "run.json"
SECRET_KEYS = ("webhook",)  # override values never logged or recorded as they are


class ProjectBusy(RuntimeError):
    """Another run holds the project folder; the message names it."""


def redact(override: str) -> str:
    """`key=value` as it may be logged: secrets (webhook URLs, credentials in URLs) hidden."""
    key, _, value = override.partition("=")
    if key.rsplit(".", 1)[-1] in SECRET_KEYS and value not in ("", "null"):
        return f"{key}=***"
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", override)


def describe(holder: dict | None) -> str:
    """A holder record as one phrase: 'flow run 'x' (finetune-pipeline/manual), pid 12 on host, since ..., URL'."""
    if not holder:
        return "another run (no record of which: .finetune/run.json is missing)"
    what = f"flow run '{holder['flow_run_name']}'" if holder.get("flow_run_name") else "a run"
    where = holder.get("deployment") or holder.get("flow") or ""
    parts = [what + (f" ({where})" if where else ""), f"pid {holder.get('pid')} on {holder.get('host')}",
             f"since {holder.get('started_at')}"]
    url = holder.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):  # not 'None/flow-runs/...' (no UI URL)
        parts.append(url)
    return ", ".join(parts)


def read_holder(root: Path) -> dict | None:
    try:
        data = json.loads((Path(root) / HOLDER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def hold(root: str | Path, wait_s: float, holder: dict, say: Callable[[str], None]) -> Iterator[dict]:
    """Hold the project folder `root` for the block: wait up to `wait_s` for another holder (saying
    whom), or raise ProjectBusy naming it. `holder` describes this run (flow run, deployment, URL...)."""
    root = Path(root)
    (root / LOCK).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        other = describe(read_holder(root))
        if wait_s <= 0:
            raise ProjectBusy(f"project {root} is in use by {other}; nothing was changed. Run again when it has "
                              "ended (or set orchestration.lock_wait_s to wait for it)") from None
        say(f"project {root} is in use by {other}: waiting up to {wait_s:g} s for it")
        try:
            lock.acquire(timeout=wait_s, poll_interval=0.5)
        except Timeout:
            raise ProjectBusy(f"project {root} is still in use by {describe(read_holder(root))} after waiting "
                              f"{wait_s:g} s (orchestration.lock_wait_s); nothing was changed") from None
    try:
        previous = read_holder(root)
        if previous and previous.get("state") == "running":
            left = previous.get("overrides") or []
            say(f"the previous run ({describe(previous)}) ended without finishing (killed?)"
                + (f"; its overrides may still be in params.yaml: {', '.join(left)}" if left else ""))
        record = {**holder, "pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(), "state": "running"}
        write_json(root / HOLDER, record)
        try:
            yield record
        finally:
            write_json(root / HOLDER, {**record, "state": "ended", "ended_at": _now()})
    finally:
        lock.release()


def describe_change(change: ParamsChange) -> list[str]:
    """What a run sets, as `key=value` lines for people (logs, the holder record, artifacts), secrets hidden."""
    lines: list[str] = []

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, item in enumerate(node):
                walk(f"{prefix}{i}.", item)
        else:
            lines.append(f"{prefix.rstrip('.')}={node if isinstance(node, str) else json.dumps(node)}")

    walk("", change.patch or {})
    return [redact(line) for line in [*lines, *change.overrides]]


class AppliedParams:
    """params.yaml with a run's validated change written in, and the text it had before (to put back)."""

    def __init__(self, change: ParamsChange):
        self.path, self.shown = change.path, describe_change(change)
        if change.changed and change.path.read_text() != change.before:
            # edited since the change was validated (another run ended meanwhile): apply it to today's file
            change = prepare_change(change.path, list(change.overrides), change.patch)
        change.write()
        self.params: Params = change.params
        self.before, self.after = change.before, change.after

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def restore(self) -> str:
        """Put the file back as it was before the run; returns what happened, for the failure message."""
        shown = ", ".join(self.shown)
        if not self.changed:
            return ""
        if self.path.read_text() != self.after:
            return (f"{self.path.name} was edited during the run and is left as it is; this run's overrides may "
                    f"still be in it: {shown}")
        atomic_write(self.path, self.before)
        return f"{self.path.name} restored: this run's overrides are no longer in it ({shown})"


@contextmanager
def params_applied(change: ParamsChange, say: Callable[[str], None]) -> Iterator[AppliedParams]:
    """Write a validated change into the params file for the block; if the block fails, restore the file and
    add what was restored to the exception's message (the flow run's failure message)."""
    applied = AppliedParams(change)
    if applied.changed:
        say(f"{applied.path.name}: " + ", ".join(applied.shown))
    try:
        yield applied
    except BaseException as exc:
        note = applied.restore()
        if note:
            say(note)
            if len(exc.args) == 1 and isinstance(exc.args[0], str):
                exc.args = (f"{exc.args[0]}; {note}",)
        raise


# ---- facts about the project, for lineage -------------------------------------------------------


class LineageError(RuntimeError):
    """The project's data dependency cannot be identified; the message says why."""


def data_dependency(root: str | Path) -> tuple[str, str]:
    """The ingest stage's data dependency (`${data.path}` in dvc.yaml, as params.yaml now resolves it)
    and its DVC hash now (DVC's own hashing, the md5 `dvc.lock` would record; cached by DVC's state
    database, so an unchanged folder is not read again)."""
    from dvc.repo import Repo

    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    if not params.data.path:
        raise LineageError("data.path is null: there is no data dependency to hash")
    target = (root / params.data.path).resolve()
    with Repo(str(root)) as repo:
        (stage,) = repo.stage.collect(f"{root / 'dvc.yaml'}:ingest")  # absolute: DVC resolves targets from the cwd
        for dep in stage.deps:
            if Path(dep.fs_path).resolve() == target:
                if not target.exists():
                    raise LineageError(f"data.path {params.data.path} does not exist in {root}")
                return dep.def_path, dep.get_hash().value
    raise LineageError(f"dvc.yaml's ingest stage does not depend on data.path ({params.data.path})")


def locked_data_hash(root: str | Path, data_path: str) -> str | None:
    """The hash `dvc.lock` recorded for the ingest stage's dependency `data_path` (what the last
    ingest read), or None."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    deps = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("ingest", {}).get("deps", [])
    return next((d.get("md5") for d in deps if d.get("path") == data_path), None)


def git_commit(root: str | Path) -> str:
    """HEAD of the project's git repository ('+dirty' when tracked files differ), or 'unknown'."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
