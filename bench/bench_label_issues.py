"""ELPV label issues: what the label_issues stage costs on this machine (cold: no feature cache; warm: features cached,
the usual rerun) and how well its label-quality score separates the cells the experts themselves were unsure of
(defect probability 1/3 or 2/3) from the sure ones (0 or 1): AUROC, per score method.

Uses the pipeline's validated manifest, images and weights (created with `finetune stage ...` when missing) and
params.yaml's `label_issues` section; the stage runs as dvc.yaml runs it (`python -m tasks.label_issues`, a fresh
process) with a private feature cache and report folder, so the project's own outputs are not touched.

`--retrain`: does training without the flagged *training* images change anything? The default recipe (params.yaml)
is trained twice on this machine, on the validated manifest and on it less the flagged train rows (validation and
test splits untouched), and each checkpoint is scored on the same test split (~6-10 min per training on 2 cores).

    .venv/bin/python bench/bench_label_issues.py             # ~5 min on 2 cores (cold ~4, warm ~0.5)
    .venv/bin/python bench/bench_label_issues.py --retrain   # + two trainings and evaluations

Prints a table and writes bench/results/label_issues.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from common import ensure_pipeline_inputs, provenance  # noqa: E402  (bench/ is on sys.path as a script)

from tasks.entry import setup_logging  # noqa: E402
from tasks.files import write_json  # noqa: E402
from tasks.manifest import read_manifest  # noqa: E402
from tasks.params import load_params  # noqa: E402

log = logging.getLogger("bench_label_issues")
UNSURE = (1 / 3, 2 / 3)


def stage_command(params: Path, out: Path, reviewed: Path, manifest: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "tasks.label_issues", "--params", str(params), "--manifest",
            str(manifest or REPO / "data/validated.csv"), "--images", str(REPO / "data/images"), "--base",
            str(REPO / "models/base"), "--reviewed", str(reviewed), "--out-dir", str(out / "reports"), "--flagged",
            str(out / "flagged.csv")]


def timed_stage(cmd: list[str], cache: Path) -> tuple[float, dict]:
    """Wall seconds of one stage process (imports, weights, features, checks, reports) and its results JSON."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, FINETUNE_CACHE_DIR=str(cache)), capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    out = Path(cmd[cmd.index("--out-dir") + 1]) / "label_issues.json"
    if not out.exists():
        raise SystemExit(f"the stage failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return round(wall, 1), json.loads(out.read_text())


def separation(params, cache: Path) -> dict:
    """AUROC of (1 - label quality) for 'the experts were unsure' (probability 1/3 or 2/3), overall and within each
    given label, for each cleanlab score method; the same out-of-fold probabilities the stage computes."""
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import roc_auc_score

    from tasks.features import cached_features, load_backbone
    from tasks.label_issues.scan import out_of_fold_probs

    m = read_manifest(REPO / "data/validated.csv")
    li = params.label_issues
    feats, _ = cached_features(load_backbone(REPO / "models/base", li.image_size), [REPO / "data/images" / p for p in
                               m["path"]], m["sha256"].tolist(), cache, params.data.workers, params.data.max_pixels)
    classes = sorted(m["label"].unique())
    y = m["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs, folds = out_of_fold_probs(feats, y, len(classes), li.folds, params.seed)
    unsure = np.isclose(m["probability"].to_numpy()[:, None], UNSURE, atol=1e-3).any(axis=1)
    out = {"n": len(m), "unsure": int(unsure.sum()), "folds": folds,
           "oof_accuracy": round(float((probs.argmax(1) == y).mean()), 4), "auroc": {}}
    for method in ("self_confidence", "normalized_margin", "confidence_weighted_entropy"):
        q = get_label_quality_scores(y, probs, method=method)
        row = {"all": round(float(roc_auc_score(unsure, -q)), 4)}
        for c in classes:
            sel = m["label"].to_numpy() == c
            if 0 < unsure[sel].sum() < sel.sum():
                row[c] = round(float(roc_auc_score(unsure[sel], -q[sel])), 4)
        out["auroc"][method] = row
    return out


def flagged_facts(data: dict) -> dict:
    """Of the flagged cells: how many the experts rated unsure, how many are test cells the default model gets
    wrong (reports/eval/predictions.csv, when the pipeline has run)."""
    m = read_manifest(REPO / "data/validated.csv").set_index("path")
    flagged = [r["path"] for r in data["label_issues"]]
    p = m.loc[flagged, "probability"].to_numpy() if flagged else np.zeros(0)
    facts = {"flagged": len(flagged), "flagged_unsure": int(np.isclose(p[:, None], UNSURE, atol=1e-3).any(axis=1).sum()),
             "base_rate_unsure": round(float(np.isclose(m["probability"].to_numpy()[:, None], UNSURE,
                                                        atol=1e-3).any(axis=1).mean()), 4),
             "per_split": {s: int((m.loc[flagged, "split"] == s).sum()) for s in ("train", "val", "test")}}
    preds = REPO / "reports/eval/predictions.csv"
    if preds.exists():
        import pandas as pd

        pr = pd.read_csv(preds, dtype=str, keep_default_na=False)
        wrong = set(pr.loc[pr["actual"] != pr["predicted"], "path"])
        test_flagged = [f for f in flagged if m.at[f, "split"] == "test"]
        facts["default_model_test_errors"] = len(wrong)
        facts["flagged_test_cells_the_default_model_gets_wrong"] = f"{len(set(test_flagged) & wrong)}/{len(test_flagged)}"
    return facts


def train_and_score(manifest: Path, out: Path) -> dict:
    """The default recipe (params.yaml) on `manifest`, scored on the test split of the validated manifest."""
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=REPO, check=True)  # noqa: E731
    t0 = time.perf_counter()
    run("tasks.train", "--params", "params.yaml", "--manifest", str(manifest), "--images", "data/images", "--base",
        "models/base", "--checkpoint", str(out / "model.pt"), "--metrics", str(out / "summary.json"), "--history",
        str(out / "history.csv"), "--state", str(out / "state.pt"), "--no-resume")
    train_s = time.perf_counter() - t0
    run("tasks.evaluate", "--params", "params.yaml", "--checkpoint", str(out / "model.pt"), "--manifest",
        "data/validated.csv", "--images", "data/images", "--out-dir", str(out / "eval"))
    test = json.loads((out / "eval/metrics.json").read_text())
    val = json.loads((out / "summary.json").read_text())["best"]["val"]
    return {"n_train": int((read_manifest(manifest)["split"] == "train").sum()), "train_s": round(train_s),
            "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "test_accuracy": test["accuracy"],
            "test_accuracy_ci": test["ci"]["accuracy"], "test_macro_f1": test["macro_f1"]}


def retrain(flagged: list[str], work: Path) -> dict:
    m = read_manifest(REPO / "data/validated.csv")
    drop = m["path"].isin(flagged) & (m["split"] == "train")
    (work / "filtered").mkdir(parents=True, exist_ok=True)
    m[~drop].to_csv(work / "filtered" / "manifest.csv", index=False)
    log.info("retrain: the default recipe on all %d train images, then without the %d flagged ones", int(
        (m["split"] == "train").sum()), int(drop.sum()))
    return {"dropped_train_images": int(drop.sum()),
            "all": train_and_score(REPO / "data/validated.csv", work / "all"),
            "without_flagged": train_and_score(work / "filtered" / "manifest.csv", work / "filtered")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--retrain", action="store_true", help="also train the default recipe with and without the "
                    "flagged train images (~15-20 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/label_issues.json")
    args = ap.parse_args(argv)
    setup_logging()
    ensure_pipeline_inputs(REPO, args.params, log)
    params = load_params(args.params)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-label-issues-") as tmp:
        work = Path(tmp)
        (work / "reviewed.csv").write_text("path,note\n")
        cmd = stage_command(args.params, work, work / "reviewed.csv")
        cold_s, data = timed_stage(cmd, work / "cache")
        warm_s, data = timed_stage(cmd, work / "cache")
        sep = separation(params, work / "cache" / "features")  # where the stage put them (tasks.features.cache_root)
        result = {"cold_s": cold_s, "warm_s": warm_s, "timings_warm": data["timings"], "backbone": data["backbone"],
                  "counts": data["counts"], "status": data["status"], "params": params.label_issues.model_dump(),
                  "separation": sep, "flagged": flagged_facts(data)}
        if args.retrain:
            result["retrain"] = retrain([r["path"] for r in data["label_issues"]], work)
    command = ".venv/bin/python bench/bench_label_issues.py" + (f" {' '.join(argv)}" if argv else "")
    import torch

    write_json(args.out, {**provenance(REPO, command, torch.get_num_threads(), load), **result})
    print_table(result)
    print(f"\nwrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    b, s, f = r["backbone"], r["separation"], r["flagged"]
    print(f"\nlabel_issues stage on {s['n']} ELPV cells ({b['arch']} at {b['size']} px): cold {r['cold_s']} s "
          f"(features computed), warm {r['warm_s']} s (cached); out-of-fold accuracy {s['oof_accuracy']:.4f}")
    print(f"flagged: {f['flagged']} likely label errors ({f['flagged_unsure']} rated 1/3 or 2/3 by the experts; base "
          f"rate {100 * f['base_rate_unsure']:.1f}%), {r['counts']['near_duplicates']} near-duplicate pairs, "
          f"{r['counts']['outliers']} outliers")
    print(f"\nAUROC, label-quality score vs 'experts unsure' ({s['unsure']} of {s['n']} cells):")
    for method, row in s["auroc"].items():
        print(f"  {method:28} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if "retrain" in r:
        print(f"\nretrain (default recipe; {r['retrain']['dropped_train_images']} flagged train images dropped):")
        for name, row in (("all", r["retrain"]["all"]), ("without flagged", r["retrain"]["without_flagged"])):
            print(f"  {name:16} n_train {row['n_train']}  val acc {100 * row['val_accuracy']:.2f}%  val F1 "
                  f"{100 * row['val_macro_f1']:.2f}%  test acc {100 * row['test_accuracy']:.2f}%  test F1 "
                  f"{100 * row['test_macro_f1']:.2f}%  ({row['train_s']} s)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
