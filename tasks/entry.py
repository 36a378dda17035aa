"""How a stage runs as a command (`python -m tasks.<stage>`, which `dvc.yaml` calls).

Each stage module has a `main(argv)` that parses its paths with `stage_parser`, loads the typed
params at the edge, and calls its plain `run(...)` inside `friendly()`: any failure becomes one line,
`error: <message>`, and exit status 1 (`--debug` or FINETUNE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

NOISY_LOGGERS = ("great_expectations", "matplotlib", "PIL", "urllib3", "httpx", "httpcore", "onnxscript", "onnx_ir", "torch.onnx")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("FINETUNE_DEBUG") == "1"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults shown, and the stage's docstring kept as written."""


def stage_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options every stage has (`--params`, `--debug`); the stage adds its paths."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip(), formatter_class=_HelpFormatter)
    parser.add_argument("--params", "-p", type=Path, default=Path("params.yaml"), help="params file (YAML)")
    parser.add_argument("--debug", action="store_true", help="show the traceback on errors")
    return parser


@contextmanager
def friendly(debug: bool = False, keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Expected failures -> `error: <message>` on stderr and exit 1 (the traceback with --debug).
    Exceptions of the `keep` types pass through untouched (e.g. a CLI framework's own exit)."""
    setup_logging()
    try:
        yield
    except keep:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # the one place errors become messages
        if debug_enabled(debug):
            raise
        message = " ".join(str(exc).strip().split("\n")) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


@dataclass(frozen=True)
class Option:
    """A stage option that is not a path (argparse's add_argument arguments)."""

    flags: tuple[str, ...]
    kwargs: dict


def stage_main(stage: str, doc: str | None, argv: list[str] | None, body: Callable[[Any, argparse.Namespace], None],
               *options: Option, **paths: tuple[str, str]) -> None:
    """Run pipeline stage `stage` (its name in `tasks.stages`) as a command: parse `--params`, `--debug`, the
    stage's path options with the defaults `tasks.stages` declares (`out_dir` becomes `--out-dir`), any other
    `paths` (`name=(default, help)`) and options, load the typed params at the edge, then `body(params, args)`
    inside `friendly`."""
    from tasks.params import load_params
    from tasks.stages import stage as stage_of

    spec = stage_of(stage)
    parser = stage_parser("python -m " + spec.command, doc)
    for name, (default, help_) in {**spec.path_options(), **paths}.items():
        parser.add_argument("--" + name.replace("_", "-"), type=Path, default=Path(default), help=help_)
    for option in options:
        parser.add_argument(*option.flags, **option.kwargs)
    args = parser.parse_args(argv)
    with friendly(args.debug):
        body(load_params(args.params), args)
