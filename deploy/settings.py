"""What the server is (name, version) and what it can be set to (`Settings`).

A module of its own so that the routes (which read the token, the limits and top-k) and the server (which builds
the settings from its command line) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.images import DEFAULT_MAX_PIXELS

SERVER_NAME = "finetune-serving"
SERVER_VERSION = "0.1.0"


@dataclass(frozen=True)
class Settings:
    """Everything `python -m deploy.server` / `finetune serve` can set (`--help` documents each)."""

    model: str = "champion"
    registry: Path = Path("registry")
    precision: str = "fp32"
    name: str = "classifier"
    host: str = "127.0.0.1"
    port: int = 8000
    fd: int | None = None
    token: str | None = None
    max_body_bytes: int = 64 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64
    top_k: int = 3
    batching: bool = False
    max_batch: int = 32
    batch_delay_ms: float = 0.0
    concurrency: int | None = None  # None: one model call per core (measured best on CPU: docs/serving.md)
    threads: int | None = None      # None: cores / concurrency
    poll_s: float = 1.0
    log_level: str = "info"
    log_format: str = "json"
    access_log: bool = True
