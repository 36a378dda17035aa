"""Fetch stage: resolve the pretrained weights named in `model.*`, verify them, save them.

Writes `<out>/weights.pt` (the state_dict in the architecture's own naming) and
`<out>/meta.json` ({source, arch, weights, sha256, num_params, mean, std, ...}); both are
DVC outputs, so a changed weight file reruns training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tasks import models
from tasks.io import atomic_path, write_json

log = logging.getLogger(__name__)


def run(source: str, arch: str, weights: str, sha256: str | None, out_dir: Path) -> dict:
    model, meta = models.create(source, arch, weights, sha256)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "weights.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(out_dir / "meta.json", meta)
    log.info("fetch_model: %s/%s (%s params), sha256 %s... verified", source, arch, f"{meta['num_params']:,}",
             meta["sha256"][:12])
    return meta
