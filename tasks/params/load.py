"""Reading params: YAML in (comments kept), `--set` overrides, validation that names the key, writing back.

Reading validates: unknown keys and bad values are refused with the dotted key named, so a typo in `params.yaml`
or in `--set` fails before any work starts.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML

from tasks.params.schema import Params


class ParamsError(ValueError):
    """A params file or override is unusable; the message names the key and the problem."""


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps the comments that document every knob
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


def parse_value(text: str) -> Any:
    """Parse one `--set` value as YAML (so `1e-3`, `true`, `[a, b]` and `null` work)."""
    value = YAML(typ="safe").load(text)
    return text if value is None and text.strip() not in ("null", "~", "") else value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides in place; unknown top-level paths are caught by validation."""
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override '{item}' is not of the form key=value (e.g. train.batch_size=16)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if isinstance(node, list):  # e.g. train.stages.1.lr
                if not part.isdigit() or int(part) >= len(node):
                    raise ParamsError(f"override '{key}': '{where}' is not an index of a {len(node)}-item list")
                part = int(part)
            elif not isinstance(node, dict):
                raise ParamsError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
            if last:
                node[part] = parse_value(text)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        key = key.replace("validate_", "validate")
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
            lines.append(f"{source}: bad value for '{key}': {shown} ({e['msg']})")
    return "; ".join(lines)


def read_raw(path: Path) -> dict:
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = _yaml().load(path.read_text())
    except Exception as exc:  # ruamel raises many types; the message is what matters
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def validate_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(_plain(raw))
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; raise ParamsError naming the key on any problem."""
    path = Path(path)
    raw = apply_overrides(read_raw(path), overrides or [])
    return validate_params(raw, str(path))


def write_overrides(path: str | Path, overrides: list[str]) -> Params:
    """Validate `overrides` and write them into the params file, keeping its comments.

    Like `dvc exp run --set-param`: the file DVC tracks must say what produced the outputs.
    """
    from tasks.files import atomic_write

    path = Path(path)
    raw = apply_overrides(read_raw(path), overrides)
    params = validate_params(raw, str(path))
    buf = io.StringIO()
    _yaml().dump(raw, buf)
    atomic_write(path, buf.getvalue())
    return params


def _plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts/lists for pydantic."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
