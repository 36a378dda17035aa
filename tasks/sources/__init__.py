"""Data sources: the registry of what every stage needs to know about each source, without reading any data.

`SOURCES` maps a `data.source` name to its policy: the one-line description params.yaml shows, the columns its
splits are stratified by (`data.split.stratify_by: auto`), whether its images mean the same rotated or mirrored
(`data.orientation_invariant: auto`), whether it needs `data.path`, whether its rows carry a defect probability
(`data.task`, `train.soft_targets`). The params schema builds `data.source`'s allowed values from these keys.

Why this module is light (no pandas, no PIL, no reader imported): every stage loads the params, so every stage's
code closure (`dvc.yaml`) holds this file. The readers live in one module per source (`elpv`, `folder`,
`manifest`, sharing `common`), dispatched by `tasks.sources.readers`, which only ingest and `finetune validate`
import: editing a reader reruns ingest, never training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourcePolicy:
    """What a source implies for the stages (the reader itself is in `tasks.sources.<name>`)."""

    description: str  # one line: what `data.source: <name>` reads (params.yaml's data.source comment)
    stratify_by: tuple[str, ...] = ()  # columns besides the label that `split.stratify_by: auto` stratifies by
    orientation_invariant: bool = False  # what `data.orientation_invariant: auto` means for this source
    needs_path: bool = True  # data.path must name the data folder
    probabilities: bool = False  # rows carry a defect probability: `data.task` applies, soft targets are possible


SOURCES: dict[str, SourcePolicy] = {
    "elpv": SourcePolicy(
        "bundled solar-cell EL images",
        stratify_by=("probability", "type"),  # the Deitsch et al. protocol: defect probability and cell type
        orientation_invariant=True, needs_path=False, probabilities=True),
    "folder": SourcePolicy("path/<class>/*, or split up front: path/<split>/<class>/* with split folders train, val "
                           "or valid, test"),
    "manifest": SourcePolicy("a CSV/Parquet table path,label[,split] in the folder `path`, named by `manifest`"),
}


def describe() -> str:
    """Every source with its description, as params.yaml documents `data.source`."""
    return " | ".join(f"{name} ({policy.description})" for name, policy in SOURCES.items())


def with_probabilities() -> list[str]:
    """The sources whose rows carry a defect probability."""
    return [name for name, policy in SOURCES.items() if policy.probabilities]
