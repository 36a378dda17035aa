"""Does the staged recipe earn its keep? The default `train.stages` against the frozen stage alone
and the unfrozen stage alone, same data, seed and total epochs, each scored on the test split.

Uses the pipeline's own train and evaluate stages on the data in `data/` (the bundled ELPV set
after `make run`; missing inputs are created with `finetune stage ingest/validate/fetch-model`).

    .venv/bin/python bench/bench_recipes.py                       # all three: ~25 min on 2 idle cores
    .venv/bin/python bench/bench_recipes.py --recipes frozen_only

Prints a table and writes bench/results/recipes.json (checkpoints under bench/results/recipes/).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import evaluate  # noqa: E402
from tasks.entry import setup_logging  # noqa: E402
from tasks.files import write_json  # noqa: E402
from tasks.params import TrainParams, augmentations, load_params  # noqa: E402
from tasks.train import stage as train_stage  # noqa: E402

log = logging.getLogger("bench_recipes")
MANIFEST, IMAGES, BASE = REPO / "data/validated.csv", REPO / "data/images", REPO / "models/base"


def recipes(default: TrainParams) -> dict[str, TrainParams]:
    """Default stages; each stage alone with the default's total epochs (a fair budget)."""
    total = sum(s.epochs for s in default.stages)
    frozen, unfrozen = default.stages[0], default.stages[-1]
    return {
        "default": default,
        "frozen_only": default.model_copy(update={"stages": [frozen.model_copy(update={"epochs": total})]}),
        "unfrozen_only": default.model_copy(update={"stages": [unfrozen.model_copy(update={"epochs": total})]}),
    }


def ensure_inputs(params_file: Path) -> None:
    for stage, needed in (("ingest", REPO / "data/manifest.csv"), ("validate", MANIFEST), ("fetch-model", BASE)):
        if not needed.exists():
            log.info("creating %s: finetune stage %s", needed.relative_to(REPO), stage)
            subprocess.run([sys.executable, "-m", "finetune", "stage", stage, "--params", str(params_file)],
                           cwd=REPO, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--recipes", nargs="*", default=["default", "frozen_only", "unfrozen_only"],
                    choices=["default", "frozen_only", "unfrozen_only"])
    args = ap.parse_args()
    setup_logging()
    params = load_params(args.params)
    ensure_inputs(args.params)
    out_root = REPO / "bench/results/recipes"
    rows = []
    train = params.train.model_copy(update={"augment": augmentations(params.data, params.train)})
    for name, p in recipes(train).items():
        if name not in args.recipes:
            continue
        out = out_root / name
        log.info("recipe %s: %s", name, [(s.name, s.epochs, s.trainable) for s in p.stages])
        t0 = time.time()
        summary = train_stage.run(MANIFEST, IMAGES, BASE, p, params.seed, out / "model.pt", out / "summary.json",
                            out / "history.csv", workers=params.data.workers)
        metrics = evaluate.run(out / "model.pt", MANIFEST, IMAGES, out / "metrics.json", out / "predictions.csv",
                               out / "confusion.png", batch_size=p.batch_size, workers=params.data.workers)
        rows.append({
            "recipe": name, "stages": " + ".join(f"{s.name}:{s.trainable}x{s.epochs}" for s in p.stages),
            "accuracy": metrics["accuracy"], "accuracy_ci": metrics.get("ci", {}).get("accuracy"),
            "macro_recall": metrics["macro_recall"], "macro_f1": metrics["macro_f1"],
            "train_s": summary["wall_time_s"], "total_s": round(time.time() - t0, 1),
            "best_epoch": summary["best"]["global_epoch"], "n_test": metrics["n"],
        })
        write_json(REPO / "bench/results/recipes.json", {"params": str(args.params), "rows": rows})
    print(f"\n{'recipe':14} {'stages':38} {'test acc':>8} {'95% CI':>13} {'recall':>7} {'F1':>7} {'train s':>8} best ep")
    for r in rows:
        ci = "-" if not r["accuracy_ci"] else f"{r['accuracy_ci'][0]:.3f}-{r['accuracy_ci'][1]:.3f}"
        print(f"{r['recipe']:14} {r['stages']:38} {r['accuracy']:8.4f} {ci:>13} {r['macro_recall']:7.4f} "
              f"{r['macro_f1']:7.4f} {r['train_s']:8.0f} {r['best_epoch']:>7}")
    print(f"\nwrote {REPO / 'bench/results/recipes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
