"""Ours vs the usual recipes on the same split, model, input size, batch size, augmentation, threads and
epoch budget: wall time, images/s, test accuracy / balanced accuracy / macro recall / macro F1, ratios to ours.

  ours       the pipeline's own train stage (`tasks.train.stage.run`: its default stages, the frozen one for
             --frozen-epochs, the unfrozen one for --unfrozen-epochs) and evaluate stage (`tasks.evaluate.run`)
  plain      the classic PyTorch loop: freeze all but the classifier, SGD 0.001 / momentum 0.9 (bench/peers/plain_loop.py,
             in this environment)
  fastai     `Learner.fine_tune(unfrozen, freeze_epochs=frozen)` (bench/peers/fastai_fine_tune.py)
  lightning  `BackboneFinetuning(unfreeze_backbone_at_epoch=frozen)` (bench/peers/lightning_backbone_finetuning.py)

fastai and Lightning run in their own environment, bench/.venv-peers (`make bench-peers-env`), never in the
project's; without it their rows say 'not installed'. Every run starts from the same module: the bundled
EfficientNet-Lite0 with the seeded fresh head the train stage would build (saved once, rebuilt by each peer with
the same timm and checked against the project's logits; see bench/peers/peer_common.py), and augments with the 8
flips/90-degree rotations. Data: the pipeline's `data/validated.csv` + `data/images` (created with `finetune stage
ingest/validate/fetch-model` when missing); --n-train/--n-val/--n-test take seeded subsamples for smoke runs.

    .venv/bin/python bench/bench_peers.py                        # full ELPV split, 224 px, 1 frozen + 2 unfrozen epochs
    .venv/bin/python bench/bench_peers.py --n-train 64 --n-val 32 --n-test 32 --size 96 \\
        --frozen-epochs 1 --unfrozen-epochs 0 --threads 1       # smoke run, about a minute per run
    .venv/bin/python bench/bench_peers.py --runs ours plain      # without the peers' environment

Prints a table and writes bench/results/peers.json (each run's files under bench/results/peers/).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from common import ensure_pipeline_inputs, provenance  # noqa: E402  (bench/ is on sys.path as a script)

from tasks import backbones, evaluate  # noqa: E402
from tasks.entry import setup_logging  # noqa: E402
from tasks.files import read_json, write_json  # noqa: E402
from tasks.manifest import classes_of, read_manifest  # noqa: E402
from tasks.metrics import bootstrap_ci, classification_metrics  # noqa: E402
from tasks.params import DIHEDRAL_AUGMENT, load_params  # noqa: E402
from tasks.train import stage as train_stage  # noqa: E402

log = logging.getLogger("bench_peers")
PEERS = REPO / "bench/peers"
PEER_PYTHON = REPO / "bench/.venv-peers/bin/python"
RUNS = {  # name -> (script, needs the peers' environment)
    "ours": (None, False),
    "plain": ("plain_loop.py", False),
    "fastai": ("fastai_fine_tune.py", True),
    "lightning": ("lightning_backbone_finetuning.py", True),
}
LABELS = {"ours": "ours (pipeline train + evaluate stages)", "plain": "plain PyTorch loop (classic recipe)",
          "fastai": "fastai fine_tune", "lightning": "Lightning BackboneFinetuning"}


# ---- inputs ---------------------------------------------------------------------------------------


def subsample(manifest: pd.DataFrame, counts: dict[str, int], seed: int) -> pd.DataFrame:
    """Seeded subsample of each split (0 = all of it); order kept."""
    parts = []
    for i, (split, n) in enumerate(counts.items()):
        rows = manifest[manifest["split"] == split]
        if 0 < n < len(rows):
            keep = np.sort(np.random.default_rng(seed + i).choice(len(rows), n, replace=False))
            rows = rows.iloc[keep]
        parts.append(rows)
    return pd.concat(parts).sort_index()


def prepare(args, work: Path) -> dict:
    """The shared inputs: the (subsampled) manifest for ours, images.csv with absolute paths for the peers, and
    the starting module (bundled weights + the train stage's seeded fresh head) with reference logits."""
    manifest = read_manifest(args.manifest)
    manifest = subsample(manifest, {"train": args.n_train, "val": args.n_val, "test": args.n_test}, args.seed)
    classes = classes_of(manifest)
    inp = work / "input"
    inp.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(inp / "manifest.csv", index=False)
    images = Path(args.images).resolve()
    pd.DataFrame({"file": [str(images / p) for p in manifest["path"]], "label": manifest["label"],
                  "split": manifest["split"]}).to_csv(inp / "images.csv", index=False)
    meta = read_json(Path(args.base) / "meta.json")
    if meta["source"] not in ("bundled", "timm", "checkpoint"):
        raise SystemExit(f"the peers rebuild timm architectures; model.source '{meta['source']}' is not one")
    # exactly what the train stage does (tasks/train/stage.py): build, load the fetched weights, seeded new head
    model = backbones.build(meta)
    model.load_state_dict(torch.load(Path(args.base) / "weights.pt", map_location="cpu", weights_only=True))
    backbones.with_new_head(model, len(classes), args.seed)
    model.eval()
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    torch.save(model.state_dict(), inp / "model.pt")
    torch.save({"input": x, "logits": logits}, inp / "reference.pt")
    import timm

    pre = meta["preprocessing"]
    info = {"arch": meta.get("weights_name") or meta["arch"],
            "timm_kwargs": {"bn_eps": 1e-3} if meta["source"] == "bundled" else {},  # as timm_models.build
            "classes": classes, "mean": pre["mean"], "std": pre["std"], "size": args.size, "seed": args.seed,
            "timm": timm.__version__, "weights_sha256": meta.get("sha256")}
    write_json(inp / "model.json", info)
    counts = manifest["split"].value_counts().to_dict()
    log.info("inputs: %s; %d train / %d val / %d test images, classes %s, %d px", inp, counts.get("train", 0),
             counts.get("val", 0), counts.get("test", 0), classes, args.size)
    return {"dir": inp, "classes": classes, "counts": counts, "source": str(args.manifest)}


# ---- the runs -------------------------------------------------------------------------------------


def run_ours(args, inputs: dict, out: Path) -> dict:
    """The pipeline's train and evaluate stages, its default stages cut to the shared budget."""
    params = load_params(args.params)
    default = params.train.stages
    if len(default) < 2:
        raise SystemExit(f"{args.params}: train.stages needs a frozen and an unfrozen stage to cut the budget from")
    stages = [default[0].model_copy(update={"epochs": args.frozen_epochs}),
              default[-1].model_copy(update={"epochs": args.unfrozen_epochs})]
    train = params.train.model_copy(update={"stages": stages, "image_size": args.size, "cpu_image_size": args.size,
                                            "batch_size": args.batch_size, "threads": args.threads,
                                            "augment": list(DIHEDRAL_AUGMENT)})
    manifest, images = inputs["dir"] / "manifest.csv", Path(args.images)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = train_stage.run(manifest, images, Path(args.base), train, args.seed, out / "model.pt",
                              out / "summary.json", out / "history.csv", workers=args.threads)
    evaluate.run(out / "model.pt", manifest, images, out / "metrics.json", out / "predictions.csv",
                 out / "confusion.png", batch_size=args.batch_size, workers=args.threads)
    history = pd.read_csv(out / "history.csv")
    n_train = summary["n_train"]
    return {"wall_s": summary["wall_time_s"], "images_per_s": round(n_train * (args.frozen_epochs + args.unfrozen_epochs)
                                                                    / summary["wall_time_s"], 2),
            "process_s": round(time.time() - t0, 1),
            "recipe": " + ".join(f"{s.name}: trainable {s.trainable}, {s.optimizer} lr {s.lr}, {s.schedule}, bn "
                                 f"{s.bn}, {s.epochs} ep" for s in stages) + (
                "; last epoch kept" if train.select_metric == "last" else f"; best val {train.select_metric} kept"),
            "epochs": [{"epoch": int(r.global_epoch), "seconds": round(float(r.seconds), 2),
                        "val_accuracy": float(r.val_accuracy)} for r in history.itertuples()],
            "versions": {"torch": torch.__version__}, "predictions": out / "predictions.csv", "path_column": "path"}


def run_script(name: str, args, inputs: dict, out: Path) -> dict:
    script, needs_env = RUNS[name]
    python = str(PEER_PYTHON) if needs_env else sys.executable
    if needs_env and not PEER_PYTHON.exists():
        return {"status": "not installed: make bench-peers-env"}
    cmd = [python, str(PEERS / script), "--input", str(inputs["dir"]), "--out", str(out),
           "--frozen-epochs", str(args.frozen_epochs), "--unfrozen-epochs", str(args.unfrozen_epochs),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--workers", str(args.workers),
           "--seed", str(args.seed)]
    log.info("run %s: %s", name, " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore::FutureWarning"}
    done = subprocess.run(cmd, cwd=REPO, env=env)
    if done.returncode != 0 or not (out / "result.json").exists():
        return {"status": f"failed (exit {done.returncode}); rerun: {' '.join(cmd)}"}
    r = read_json(out / "result.json")
    return {**{k: r[k] for k in ("wall_s", "images_per_s", "process_s", "recipe", "epochs", "versions")},
            "setup": r["setup"], "predictions": out / "predictions.csv", "path_column": "file"}


def score(predictions: Path, classes: list[str]) -> dict:
    """The project's metrics (tasks.metrics) for every run alike, from its per-image predictions."""
    p = pd.read_csv(predictions, dtype=str, keep_default_na=False)
    y_true = np.array([classes.index(c) for c in p["actual"]])
    y_pred = np.array([classes.index(c) for c in p["predicted"]])
    m = classification_metrics(y_true, y_pred, classes)
    ci = bootstrap_ci(y_true, y_pred, len(classes), classes=classes)
    return {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_recall", "macro_f1", "n")} | {
        "ci": {k: ci[k] for k in ("accuracy", "macro_f1")} if ci else {},
        "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()}}


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (default: all)")
    ap.add_argument("--size", type=int, default=224, help="input size in px, every run (default 224)")
    ap.add_argument("--frozen-epochs", type=int, default=1, help="epochs with the backbone frozen (default 1)")
    ap.add_argument("--unfrozen-epochs", type=int, default=2, help="epochs after the unfreeze (default 2; the plain "
                    "loop trains its head for frozen + unfrozen epochs)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per step, every run (default 16)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch CPU threads and image-decoding threads, every run (default: min(2, cores))")
    ap.add_argument("--workers", type=int, default=0,
                    help="DataLoader worker processes of plain/fastai/lightning (default 0: decode in the process)")
    ap.add_argument("--n-train", type=int, default=0, help="seeded subsample of the train split (default 0 = all)")
    ap.add_argument("--n-val", type=int, default=0, help="seeded subsample of the val split (default 0 = all)")
    ap.add_argument("--n-test", type=int, default=0, help="seeded subsample of the test split (default 0 = all)")
    ap.add_argument("--seed", type=int, default=None, help="head init, shuffling, subsamples (default: params seed)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params whose train stages ours uses")
    ap.add_argument("--manifest", type=Path, default=REPO / "data/validated.csv", help="validated manifest")
    ap.add_argument("--images", type=Path, default=REPO / "data/images", help="image folder the manifest points into")
    ap.add_argument("--base", type=Path, default=REPO / "models/base", help="fetch_model's output (weights + meta)")
    ap.add_argument("--work", type=Path, default=REPO / "bench/results/peers", help="inputs and each run's files")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/peers.json")
    args = ap.parse_args(argv)
    setup_logging()
    if args.seed is None:
        args.seed = load_params(args.params).seed
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if args.manifest == REPO / "data/validated.csv":
        ensure_pipeline_inputs(REPO, args.params, log)
    t_start = time.time()
    inputs = prepare(args, args.work)
    rows = []
    for name in args.runs:
        out = args.work / name
        log.info("run: %s", LABELS[name])
        r = run_ours(args, inputs, out) if name == "ours" else run_script(name, args, inputs, out)
        row = {"run": name, "label": LABELS[name], "status": r.pop("status", "ok")}
        if row["status"] == "ok":
            row |= {k: v for k, v in r.items() if k not in ("predictions", "path_column")}
            row["test"] = score(r["predictions"], inputs["classes"])
        rows.append(row)
        log.info("%s: %s", name, row["status"] if row["status"] != "ok" else
                 f"{row['wall_s']:.1f} s, {row['images_per_s']:.1f} img/s, test acc {row['test']['accuracy']:.4f}")
    ours = next((r for r in rows if r["run"] == "ours" and r["status"] == "ok"), None)
    for r in rows:
        if ours is not None and r["status"] == "ok":
            r["vs_ours"] = {"images_per_s": round(r["images_per_s"] / ours["images_per_s"], 3),
                            "wall": round(r["wall_s"] / ours["wall_s"], 3),
                            "accuracy_pt": round(100 * (r["test"]["accuracy"] - ours["test"]["accuracy"]), 2),
                            "macro_f1_pt": round(100 * (r["test"]["macro_f1"] - ours["test"]["macro_f1"]), 2)}
    command = " ".join(["bench/bench_peers.py", *(argv if argv is not None else sys.argv[1:])])
    peer_versions = {}
    for r in rows:
        peer_versions |= r.get("versions", {}) if r["run"] in ("fastai", "lightning") else {}
    result = {
        **provenance(REPO, command.strip(), args.threads, load_before),
        "setup": {"data": inputs["source"], "counts": inputs["counts"], "classes": inputs["classes"],
                  "size": args.size, "batch_size": args.batch_size, "frozen_epochs": args.frozen_epochs,
                  "unfrozen_epochs": args.unfrozen_epochs, "threads": args.threads, "workers": args.workers,
                  "seed": args.seed, "augment": "dihedral: flips + 90-degree rotations (8 variants)",
                  "model": "bundled EfficientNet-Lite0 (ImageNet) + the train stage's seeded fresh head"},
        "versions": {"torch": torch.__version__, **{k: v for k, v in peer_versions.items() if k != "torch"}},
        "rows": rows, "seconds": round(time.time() - t_start, 1),
    }
    write_json(args.out, result)
    print_table(result)
    print(f"\nwritten: {args.out} ({result['seconds']:.0f} s)")
    return result


def print_table(result: dict) -> None:
    s, m = result["setup"], result["machine"]
    print(f"\n{s['counts'].get('train', 0)} train / {s['counts'].get('val', 0)} val / {s['counts'].get('test', 0)} "
          f"test images, {s['size']} px, batch {s['batch_size']}, {s['frozen_epochs']} frozen + "
          f"{s['unfrozen_epochs']} unfrozen epochs, {s['threads']} threads; {m['cpu']} ({m['cores']} cores, load "
          f"{m['loadavg_before'][0]} before, {m['loadavg_after'][0]} after)\n")
    print("| run | wall s | images/s | test acc | 95% CI | macro F1 | ours x faster (img/s) | acc vs ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"| {r['label']} | {r['status']} | | | | | | |")
            continue
        t, ci = r["test"], r["test"]["ci"].get("accuracy")
        v = r.get("vs_ours")
        faster = f"{1 / v['images_per_s']:.2f}x" if v else "-"
        delta = f"{v['accuracy_pt']:+.2f} pt" if v else "-"
        interval = f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else "-"
        print(f"| {r['label']} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} | {100 * t['accuracy']:.2f}% | "
              f"{interval} | {t['macro_f1']:.4f} | {faster} | {delta} |")


if __name__ == "__main__":
    main()
