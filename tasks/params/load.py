"""Reading params: YAML in (comments kept), `--set` overrides, validation that names the key, writing back.

Reading validates: unknown keys and bad values are refused with the dotted key named, so a typo in `params.yaml`
or in `--set` fails before any work starts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.constructor import RoundTripConstructor

from tasks.params.schema import Params


class ParamsError(ValueError):
    """A params file or override is unusable; the message names the key and the problem."""


class _Constructor(RoundTripConstructor):
    """An integer Python refuses to parse (over 4,300 digits) stays text, so validation names its key."""

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            return str(node.value)


_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps the comments that document every knob
    yaml.Constructor = _Constructor
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml


def parse_value(text: str) -> Any:
    """Parse one `--set` value as YAML (so `1e-3`, `true`, `[a, b]` and `null` work)."""
    try:
        value = YAML(typ="safe").load(text)
    except ValueError:  # e.g. an integer of over 4,300 digits: validation names the key
        return text
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
            if len(shown) > 80:
                shown = f"{shown[:60]}... ({len(str(value))} characters)"
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


def apply_patch(raw: dict, patch: dict, prefix: str = "") -> dict:
    """Merge a nested `patch` of typed values (the run form's) into `raw` in place: sections key by key, a list of
    sections item by item (item i patches the file's item i), anything else replaced. Nothing is parsed from text."""
    for key, value in patch.items():
        where = f"{prefix}{key}"
        current = raw.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            apply_patch(current, value, where + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value) and isinstance(current, list):
            if len(value) > len(current):
                raise ParamsError(f"{where}: {len(value)} items given, the params file has {len(current)}")
            for i, item in enumerate(value):
                if isinstance(current[i], dict):
                    apply_patch(current[i], item, f"{where}.{i}.")
                else:
                    current[i] = item
        else:
            raw[key] = value
    return raw


@dataclass(frozen=True)
class ParamsChange:
    """A params file with overrides applied and validated, not yet written: its text before and after."""

    path: Path
    before: str
    after: str
    params: Params
    overrides: tuple[str, ...] = ()  # what made it, to apply again to a file edited meanwhile
    patch: dict | None = None

    @property
    def changed(self) -> bool:
        return self.after != self.before

    def write(self) -> None:
        from tasks.files import atomic_write

        if self.changed:
            atomic_write(self.path, self.after)


def prepare_change(path: str | Path, overrides: list[str] | None = None, patch: dict | None = None) -> ParamsChange:
    """`path` with a typed `patch` and then `key=value` overrides applied, validated once (ParamsError naming the
    key), rendered with its comments kept. Writing it is the caller's choice (`ParamsChange.write`); like
    `dvc exp run --set-param`, the file DVC tracks must say what produced the outputs."""
    path = Path(path)
    before = path.read_text() if path.exists() else ""
    raw = apply_overrides(apply_patch(read_raw(path), patch or {}), overrides or [])
    params = validate_params(raw, str(path))
    made = {"overrides": tuple(overrides or ()), "patch": patch}
    if _plain(raw) == _plain(read_raw(path)):
        return ParamsChange(path, before, before, params, **made)  # the same values: the file stays byte for byte
    buf = io.StringIO()
    _yaml().dump(raw, buf)
    return ParamsChange(path, before, buf.getvalue(), params, **made)


def write_overrides(path: str | Path, overrides: list[str]) -> Params:
    """Validate `overrides` and write them into the params file, keeping its comments."""
    change = prepare_change(path, overrides)
    change.write()
    return change.params


def _plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts/lists for pydantic."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
