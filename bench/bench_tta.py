"""Test-time augmentation on ELPV: the pipeline's checkpoint scored with `export.tta` = none, hflip and dihedral,
on the validation split (where the choice is made) and the test split, with the cost of each.

Uses the model exactly as evaluation and export wrap it (`tasks.tta.with_tta`), the same decode path and
metrics as the evaluate stage. Needs a trained checkpoint (`models/model.pt`, after `make run`).

    .venv/bin/python bench/bench_tta.py                   # ~4 min on 2 cores (val + test, 11 passes per image)
    .venv/bin/python bench/bench_tta.py --modes none dihedral

Prints a table and writes bench/results/tta.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import provenance  # noqa: E402  (bench/ is on sys.path as a script)

from tasks.checkpoint import load_checkpoint  # noqa: E402
from tasks.files import write_json  # noqa: E402
from tasks.manifest import read_manifest  # noqa: E402
from tasks.metrics import evaluation_metrics  # noqa: E402
from tasks.tensors import predict_logits, split_arrays  # noqa: E402
from tasks.tta import VARIANTS, with_tta  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=REPO / "models/model.pt")
    ap.add_argument("--manifest", type=Path, default=REPO / "data/validated.csv")
    ap.add_argument("--images", type=Path, default=REPO / "data/images")
    ap.add_argument("--modes", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/tta.json")
    args = ap.parse_args(argv)
    if not args.checkpoint.exists():
        print(f"{args.checkpoint} not found: train first (make run)", file=sys.stderr)
        return 2
    load = os.getloadavg()
    model, ckpt = load_checkpoint(args.checkpoint)
    manifest, pre = read_manifest(args.manifest), ckpt.preprocessing
    rows = []
    for split in ("val", "test"):
        x, y = split_arrays(manifest, args.images, split, ckpt.classes, pre.size, 2)
        for mode in args.modes:
            t0 = time.perf_counter()
            logits = predict_logits(with_tta(model, mode), x, pre.mean, pre.std, torch.device("cpu"), args.batch_size)
            seconds = time.perf_counter() - t0
            m = evaluation_metrics(y.numpy(), logits.softmax(1).numpy(), ckpt.classes, None)
            rows.append({"split": split, "tta": mode, "variants": len(VARIANTS[mode]), "n": len(y),
                         **{k: m[k] for k in ("accuracy", "macro_recall", "macro_f1")},
                         "accuracy_ci": m["ci"]["accuracy"], "seconds": round(seconds, 1),
                         "ms_per_image": round(1000 * seconds / len(y), 1)})
    command = ".venv/bin/python bench/bench_tta.py" + (f" {' '.join(argv)}" if argv else "")
    write_json(args.out, {**provenance(REPO, command, torch.get_num_threads(), load),
                          "checkpoint": str(args.checkpoint), "image_size": pre.size, "rows": rows})
    print(f"\n{'split':5} {'tta':9} {'accuracy':>9} {'95% CI':>12} {'recall':>7} {'F1':>7} {'ms/image':>9}")
    for r in rows:
        ci = f"{100 * r['accuracy_ci'][0]:.1f}-{100 * r['accuracy_ci'][1]:.1f}"
        print(f"{r['split']:5} {r['tta']:9} {100 * r['accuracy']:8.2f}% {ci:>12} {100 * r['macro_recall']:6.2f}% "
              f"{100 * r['macro_f1']:6.2f}% {r['ms_per_image']:9.1f}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
