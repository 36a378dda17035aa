"""Fetch stage: resolve the pretrained weights named in `model.*`, verify them, save them.

Writes `<out>/weights.pt` (the state_dict of the model `backbones.build(meta)` rebuilds) and
`<out>/meta.json` (source, arch, weights, weights_name, sha256, num_params, num_classes,
`preprocessing`, `pretrained`, `builder`...); both are DVC outputs, so changed weights rerun
training. Offline without the weights it fails with `WeightsError`, whose message names the
missing file and how to provide it.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path

import torch

from tasks import backbones
from tasks.entry import stage_main
from tasks.files import atomic_path, write_json
from tasks.params import Params

log = logging.getLogger(__name__)


def run(source: str, arch: str, weights: str, sha256: str | None, out_dir: Path, offline: bool | None = None) -> dict:
    """`offline=None` follows FINETUNE_OFFLINE / HF_HUB_OFFLINE (downloads allowed otherwise)."""
    model, meta = backbones.create(source, arch, weights, sha256, offline=offline)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "weights.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(out_dir / "meta.json", meta)
    pre = meta["pretrained"]
    log.info("fetch_model: %s/%s (%s, %s params), sha256 %s... verified; expects %s px (resize %s, %s), mean %s std %s",
             source, arch, meta["weights_name"], f"{meta['num_params']:,}", meta["sha256"][:12], pre["input_size"],
             pre["resize_size"], pre["interpolation"], pre["mean"], pre["std"])
    return meta


def main(argv: list[str] | None = None) -> None:
    stage_main("fetch_model", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    m = p.model
    run(m.source, m.arch, m.weights, m.sha256, args.out_dir)


if __name__ == "__main__":
    main()
