"""A local Prefect server and process worker for one project, in the background (`finetune prefect up/down`).

Everything lives in `<project>/.prefect-local/` (git-ignored): the server's database and settings
(`home/`), `server.log`, `worker.log`, the PIDs (`server.pid`, `worker.pid`) and the port. The
server binds loopback only. Readiness is observed, never assumed after a sleep: the server is up
when `GET /api/health` answers, the worker when the server lists it ONLINE in its work pool; a
process that exits while we wait fails at once with the tail of its log.

Both are started from Python in a new session (`start_new_session=True`): launched from a
non-interactive shell with `&`, a worker inherits SIGINT as ignored and then never stops on
SIGTERM (Prefect turns SIGTERM into SIGINT). Stopping goes worker first, then server; each gets
SIGTERM and, if still alive after a grace period, SIGKILL. A PID is signalled only when its
command line is still the prefect process we started (PIDs get reused).

Every process here gets PREFECT_API_URL: without it, each Prefect client would start a temporary
server of its own instead of using this one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

STATE = ".prefect-local"
DEFAULT_PORT = 4200
DEFAULT_POOL = "finetune"
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}


class LocalPrefectError(RuntimeError):
    """The local server or worker could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class Local:
    """Where one project's local Prefect server and worker keep their state."""

    root: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"

    @classmethod
    def of(cls, root: str | Path, port: int | None = None) -> Local:
        """The project's local Prefect, on `port` or the one it was last started on."""
        root = Path(root).resolve()
        saved = root / STATE / "port"
        if port is None:
            port = int(saved.read_text()) if saved.exists() else DEFAULT_PORT
        return cls(root, port)

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process that talks to this server."""
        bin_dir = str(Path(sys.executable).parent)
        return {**os.environ, **QUIET, "PREFECT_HOME": str(self.state / "home"), "PREFECT_API_URL": self.api_url,
                "PREFECT_UI_URL": self.ui_url, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


def healthy(local: Local) -> bool:
    try:
        return httpx.get(f"{local.api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _prefect(*args: str, module: str = "prefect") -> list[str]:
    return [sys.executable, "-m", module, *args]


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def _spawn(local: Local, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    local.state.mkdir(parents=True, exist_ok=True)
    log = (local.state / f"{name}.log").open("ab")
    proc = subprocess.Popen(args, cwd=local.root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    (local.state / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll `ready()` until it is true; fail at once if `proc` exits, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise LocalPrefectError(f"the {what} exited (status {proc.returncode}) before it was ready; "
                                    f"{log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise LocalPrefectError(f"the {what} was not ready after {timeout_s:g} s; {log}:\n{_tail(log)}")
        time.sleep(poll_s)


def template_database() -> Path:
    """An empty Prefect database with every migration applied, made once per Prefect version in the user's cache:
    a new server copies it instead of running Prefect's ~200 migrations on an empty file (~8 s on 2 cores, each
    time; `finetune run` without a project server starts a new one every run)."""
    import prefect

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"
    template = cache / f"prefect-{prefect.__version__}.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefect-db-", dir=cache) as tmp:
        env = {**os.environ, **QUIET, "PREFECT_HOME": tmp}
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
        proc = subprocess.run(_prefect("server", "database", "upgrade", "--yes"), env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise LocalPrefectError(f"could not create Prefect's database ({proc.returncode}):\n"
                                    f"{(proc.stdout + proc.stderr)[-3000:]}")
        made = Path(tmp) / "template.db"
        with closing(sqlite3.connect(Path(tmp) / "prefect.db")) as db, closing(sqlite3.connect(made)) as copy:
            db.backup(copy)  # with what is still in the write-ahead log
        os.replace(made, template)  # whole or absent, also with two servers starting at once
    return template


def seed_database(database: Path) -> bool:
    """Put a copy of `template_database()` where a new server will look for its database (unless a database is
    there or configured elsewhere). Without a cache to write to, nothing: the server then migrates a new one."""
    if database.exists() or any(k in os.environ for k in ("PREFECT_API_DATABASE_CONNECTION_URL",
                                                          "PREFECT_SERVER_DATABASE_CONNECTION_URL")):
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(template_database(), database)
    except (OSError, LocalPrefectError):
        database.unlink(missing_ok=True)
        return False
    return True


def start_server(local: Local, timeout_s: float = 180) -> int:
    """Start the server in the background (unless one answers already) and wait until it is healthy. A new server
    starts on a copy of `template_database()`."""
    if healthy(local):
        return int((local.state / "server.pid").read_text()) if (local.state / "server.pid").exists() else 0
    seed_database(local.state / "home" / "prefect.db")
    proc = _spawn(local, "server", _prefect("server", "start", "--host", local.host, "--port", str(local.port),
                                            "--analytics-off", module="finetune.prefect_server"), local.env())
    (local.state / "port").write_text(f"{local.port}\n")
    _wait(lambda: healthy(local), proc, "Prefect server", local.state / "server.log", timeout_s)
    return proc.pid


def ensure_pool(local: Local, pool: str) -> None:
    """A `process` work pool named `pool` (created with Prefect's default process job template if missing)."""
    from prefect.workers.process import ProcessWorker

    body = {"name": pool, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
    r = httpx.post(f"{local.api_url}/work_pools/", json=body, timeout=30)
    if r.status_code not in (200, 201, 409):  # 409: it exists
        raise LocalPrefectError(f"cannot create work pool '{pool}': {r.status_code} {r.text[:300]}")


def worker_online(local: Local, pool: str, name: str) -> bool:
    try:
        r = httpx.post(f"{local.api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and any(w.get("name") == name and w.get("status") == "ONLINE" for w in r.json())


def start_worker(local: Local, pool: str = DEFAULT_POOL, query_seconds: float = 10, timeout_s: float = 120) -> int:
    """Start a process worker for `pool` in the background and wait until the server lists it online.
    Flow runs are child processes of the worker, so they run with this Python (the project's venv)."""
    pid = _alive_pid(local, "worker")
    if pid:
        return pid
    ensure_pool(local, pool)
    name = f"finetune-{local.port}"
    env = local.env(PREFECT_WORKER_QUERY_SECONDS=f"{query_seconds:g}",
                    PREFECT_WORKER_PREFETCH_SECONDS=f"{max(5, 2 * query_seconds):g}")
    proc = _spawn(local, "worker", _prefect("worker", "start", "--pool", pool, "--name", name, "--type", "process"), env)
    _wait(lambda: worker_online(local, pool, name), proc, "Prefect worker", local.state / "worker.log", timeout_s)
    return proc.pid


def _alive_pid(local: Local, name: str) -> int | None:
    """The PID in `<name>.pid` if that process is alive and still the prefect process we started."""
    pid_file = local.state / f"{name}.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in cmdline]
    return pid if "prefect" in " ".join(words) and name in words else None


def _stop(local: Local, name: str, grace_s: float) -> str:
    pid = _alive_pid(local, name)
    (local.state / f"{name}.pid").unlink(missing_ok=True)
    if pid is None:
        return f"{name}: not running"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # its session: the server's uvicorn child, the worker's flow runs
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and not _zombie(pid):
            time.sleep(0.2)
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return f"{name}: stopped (pid {pid}" + (", killed)" if sig == signal.SIGKILL else ")")
    return f"{name}: stopped (pid {pid})"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def stop(local: Local, grace_s: float = 30) -> list[str]:
    """Stop the worker, then the server (a worker outliving its server would retry forever)."""
    return [_stop(local, "worker", grace_s), _stop(local, "server", grace_s)]


def deploy(local: Local) -> str:
    """Register the deployments of the project's prefect.yaml on the local server (`prefect deploy --all`), and
    fill their run forms with params.yaml's values (`flows.form.sync_forms`)."""
    if not (local.root / "prefect.yaml").exists():
        raise LocalPrefectError(f"{local.root / 'prefect.yaml'} not found")
    proc = subprocess.run(_prefect("--no-prompt", "deploy", "--all"), cwd=local.root, env=local.env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise LocalPrefectError(f"prefect deploy failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.form import sync_forms

    with temporary_settings(updates={PREFECT_API_URL: local.api_url}):
        filled = sync_forms(local.root)
    return proc.stdout + f"\nrun forms filled with params.yaml's values: {', '.join(filled) or 'none'}\n"


def status(local: Local) -> dict:
    return {"api_url": local.api_url, "ui_url": local.ui_url, "server_healthy": healthy(local),
            "server_pid": _alive_pid(local, "server"), "worker_pid": _alive_pid(local, "worker"),
            "state": str(local.state)}


def use_project_server(root: str | Path) -> str | None:
    """Point this process (and its children) at the project's local server when one runs and no
    PREFECT_API_URL is set; returns the API URL in use, or None (Prefect then starts a temporary one)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    local = Local.of(root)
    if not healthy(local):
        return None
    os.environ.update(PREFECT_API_URL=local.api_url, PREFECT_UI_URL=local.ui_url)
    return local.api_url


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_api(root: str | Path) -> Iterator[str]:
    """A Prefect API for this process and the processes it starts (Dask workers report task runs):
    PREFECT_API_URL, else the project's local server, else a temporary server for the block. (Prefect's
    own temporary server is per process: each Dask worker would start one of its own.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = use_project_server(root)
    if url:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        return
    with tempfile.TemporaryDirectory(prefix="prefect-tmp-") as tmp:
        local = Local(Path(tmp), free_port())
        start_server(local)
        saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_UI_URL")}
        os.environ.update(PREFECT_API_URL=local.api_url, PREFECT_UI_URL=local.ui_url)
        try:
            with temporary_settings(updates={PREFECT_API_URL: local.api_url}):
                yield local.api_url
                drain()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            stop(local, grace_s=10)


def drain() -> None:
    """Send the logs and events still queued in this process before the server goes away."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all()
