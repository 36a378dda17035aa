"""`params.yaml` rendered from the schema: every knob with its default and its description as a comment
(`finetune params defaults`, `python -m tasks.params`); a test keeps the shipped file equal to it."""

from __future__ import annotations

import textwrap
from typing import Any

from pydantic import BaseModel
from ruamel.yaml import YAML

from tasks.params.schema import Params

HEADER = """\
# Every knob of the pipeline. Validated on load (unknown keys and bad values are refused with
# the key named); override any of them with `finetune run --set section.key=value`.
# Rendered from tasks/params/schema.py (`finetune params defaults`): the defaults and these comments live there.
"""


COMMENT_COLUMN = 29
WIDTH = 118


def _scalar(value: Any) -> str:
    """A YAML scalar or flow list that reads back as `value`."""
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    plain_ok = text and YAML(typ="safe").load(text) == text and not any(c in text for c in ",[]{}#")
    return text if plain_ok else "'" + text.replace("'", "''") + "'"


def _lines(key_text: str, description: str | None) -> list[str]:
    """`key_text` with its description as an aligned end-of-line comment, wrapped."""
    if not description:
        return [key_text]
    column = max(COMMENT_COLUMN, len(key_text) + 1)
    wrapped = textwrap.wrap(description, width=max(40, WIDTH - column - 2))
    out = [key_text.ljust(column) + "# " + wrapped[0]]
    out += [" " * column + "# " + line for line in wrapped[1:]]
    return out


def _render_model(model: BaseModel, indent: int, documented: bool = True) -> list[str]:
    out: list[str] = []
    pad = " " * indent
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        description = field.description if documented else None
        if isinstance(value, BaseModel):
            if indent == 0:
                out.append("")
            out += _lines(f"{pad}{key}:", description)
            out += _render_model(value, indent + 2, documented)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            out += _lines(f"{pad}{key}:", description)
            for i, item in enumerate(value):
                item_lines = _render_model(item, indent + 4, documented and i == 0)
                first = item_lines[0].lstrip()
                out.append(f"{pad}  - {first}")
                out += item_lines[1:]
        else:
            out += _lines(f"{pad}{key}: {_scalar(value)}", description)
    return out


def render_defaults() -> str:
    """The default `params.yaml`: every knob with its default value and its description."""
    return HEADER + "\n" + "\n".join(_render_model(Params(), 0)) + "\n"
