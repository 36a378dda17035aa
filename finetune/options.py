"""What the `finetune` commands share: the common options, params loading at the edge, error handling."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from tasks import entry
from tasks.params import Params, load_params
from tasks.registry import resolve_root

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a param: dotted key=value, "
                                                     "e.g. --set train.batch_size=16 (repeatable).")]


def friendly(fn: Callable) -> Callable:
    """Run a command; any exception becomes `error: <message>` and exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with entry.friendly(Debug.on, keep=(typer.Exit,)):
                return fn(*args, **kwargs)
        except SystemExit as exc:  # entry.friendly's exit codes, as typer expects them
            raise typer.Exit(exc.code if isinstance(exc.code, int) else 1) from None

    return wrapper




class Debug:
    """--debug (or FINETUNE_DEBUG=1): tracebacks instead of one-line errors; set by the app's callback."""

    on = os.environ.get("FINETUNE_DEBUG") == "1"

def load(path: Path, overrides: list[str] | None = None) -> Params:
    return load_params(path, overrides or [])


WorkdirOpt = Annotated[Path, typer.Option(help="Project folder (a git + DVC repository).")]


RegistryOpt = Annotated[Optional[Path], typer.Option(
    "--registry", "-r", help="Registry folder; default: registry.root from the params file (relative to its folder).")]


def registry_root(params: Path, p: Params | None = None, override: Path | None = None) -> Path:
    if override is not None:
        return override
    if p is None:
        p = load(params) if params.exists() else Params()
    return resolve_root(params, p.registry.root)
