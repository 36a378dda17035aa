"""What the server is (name, version) and what it can be set to (`Settings`).

A module of its own so that the routes (which read the token, the limits and top-k) and the server (which builds
the settings from its command line) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.images import DEFAULT_MAX_PIXELS

SERVER_NAME = "finetune-serving"
SERVER_VERSION = "0.1.0"


@dataclass(frozen=True)
class DriftSettings:
    """`finetune serve --drift-*` (docs/serving.md "Drift monitoring")."""

    enabled: bool = True
    window: int = 100  # rows (images) the test looks at: the most recent ones
    every: int = 20  # rows between tests
    alpha: float = 0.002  # per test, Bonferroni over both detectors and their columns (bench/bench_drift.py)
    consecutive: int = 2  # rejections in a row that raise the alarm (and passes in a row that clear it)
    save_dir: Path | None = None  # save the alarming window's images here (off by default: they are user data)
    save_max: int = 500  # at most this many images in save_dir, all alarms together
    retrain: str | None = None  # the Prefect deployment an alarm starts, e.g. finetune-retrain/nightly
    prefect_api_url: str | None = None  # default: $PREFECT_API_URL
    cooldown_s: float = 3600.0  # at most one retraining request this often


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
    allow_unauthenticated: bool = False  # serve on a non-loopback address without a token (something in front authenticates)
    max_body_bytes: int = 64 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_memory_mb: int = 256  # image decoding in flight, all uploads together (deploy/decode.py)
    max_files: int = 64
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (deploy/connection.py)
    max_header_bytes: int = 32 << 10
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
    drift: DriftSettings = field(default_factory=DriftSettings)
