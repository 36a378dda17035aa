"""The model card (Markdown) of an export, rendered from `model_card.md.j2` with Jinja2.

Everything in it comes from the run's artifacts; this module only gathers them into the
template's context. Edit the wording in the template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from tasks.checkpoint import Checkpoint
from tasks.export.int8 import INT8_OP_TYPES

TEMPLATE = Path(__file__).with_name("model_card.md.j2")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ci(metrics: dict, name: str) -> str:
    ci = (metrics.get("ci") or {}).get(name)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return f"{_pct(ci[0])} – {_pct(ci[1])}"
    return ""


def data_summary(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per class in each split."""
    counts = {split: {str(k): int(v) for k, v in rows["label"].astype(str).value_counts().sort_index().items()}
              for split, rows in manifest.groupby("split")}
    return {split: counts.get(split, {}) for split in ("train", "val", "test")}


def render(metadata: dict[str, str], ckpt: Checkpoint, metrics: dict, verdict: dict, check: dict, int8: dict,
           counts: dict, data_description: str | None = None) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["pct"] = _pct
    env.filters["code"] = lambda s: f"`{s}`"
    train = (ckpt.config or {}).get("train") or {}
    recipe = int8.get("recipe") or {}
    context = {
        "arch": ckpt.base.get("arch", "?"), "classes": ckpt.classes, "pre": ckpt.preprocessing, "metadata": metadata,
        "onnx_name": Path(check.get("onnx_path", "model.onnx")).name, "check": check, "counts": counts,
        "data_description": data_description, "weights": json.loads(metadata.get("weights_origin") or "{}"),
        "train": train, "seed": (ckpt.config or {}).get("seed"), "best": ckpt.best, "metrics": metrics,
        "ci": {name: _ci(metrics, name) for name in ("accuracy", "macro_recall", "macro_f1")},
        "per_class": metrics.get("per_class") or {}, "verdict": verdict,
        "active_gates": [g for g in verdict.get("gates") or [] if g.get("bound") is not None],
        "champion": verdict.get("champion") or {}, "int8": int8,
        "int8_ops": ", ".join(f"{op} {n}" for op, n in (recipe.get("quantized_ops") or {}).items()
                              if op in INT8_OP_TYPES or not n.startswith("0/")),
        "elpv": bool(data_description and "elpv" in data_description.lower()),
    }
    return env.get_template(TEMPLATE.name).render(**context)
