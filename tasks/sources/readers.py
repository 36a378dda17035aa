"""The one dispatch from `data.source` to its reader: `read_source(data)`.

`READERS` must name exactly the sources the registry (`tasks.sources.SOURCES`) declares: a source with a policy
but no reader (or the reverse) stops at import, naming both files. Only ingest and `finetune validate` import this
module, so the readers are in their code closure and in no other stage's.
"""

from __future__ import annotations

from typing import Callable

from tasks.params import DataParams
from tasks.sources import SOURCES, elpv, folder, manifest
from tasks.sources.common import SourceTable

READERS: dict[str, Callable[[DataParams], SourceTable]] = {
    "elpv": elpv.read,
    "folder": folder.read,
    "manifest": manifest.read,
}

if set(READERS) != set(SOURCES):
    raise ImportError(f"tasks/sources/readers.py READERS names {sorted(READERS)} but tasks/sources/__init__.py SOURCES "
                      f"names {sorted(SOURCES)}: give every source both a policy in SOURCES and a reader here")


def read_source(data: DataParams) -> SourceTable:
    """The rows, declared classes and whole splits of the source `data` names (`data.source`, `data.path`, and the
    keys that source reads)."""
    return READERS[data.source](data)
