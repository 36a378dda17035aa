"""Evaluate stage: the trained checkpoint on the held-out test split -> DVC metrics and plots.

Writes `metrics.json` (accuracy, balanced accuracy, macro precision/recall/F1, per-class
precision/recall/F1/ROC-AUC/PR-AUC, ROC-AUC and PR-AUC (binary: the positive class,
`gates.positive_class`; more classes: one-vs-rest macro), expected calibration error, the
confusion matrix, 95% bootstrap CIs of the headline metrics), the per-image predictions
(`predictions.csv`, also DVC's confusion-matrix plot data), ROC and PR curve points (`roc.csv`,
`pr.csv`, DVC plots) and PNGs of the confusion matrix and the curves. Preprocessing comes from
the checkpoint, never from params, so evaluation sees exactly what training saw.
"""

from __future__ import annotations

import logging
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.checkpoint import load_checkpoint
from tasks.device import pick_device
from tasks.entry import stage_main
from tasks.files import atomic_path, write_json
from tasks.images import DEFAULT_MAX_PIXELS
from tasks.manifest import read_manifest
from tasks.metrics import curves, evaluation_metrics, positive_index
from tasks.params import Params
from tasks.tensors import DecodedOnDemand, predict_logits, split_labels
from tasks.tta import with_tta

log = logging.getLogger(__name__)


def plot_confusion(matrix, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curve(data: dict, x: str, y: str, path: Path, title: str, diagonal: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(data[x], data[y], drawstyle="steps-post" if not diagonal else "default")
    if diagonal:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_curves(labels, probs, positive: int | None, metrics: dict, out_dir: Path) -> None:
    """roc.csv / pr.csv (DVC plot data) and roc.png / pr.png."""
    roc, pr, label = curves(labels, probs, positive)
    for name, data in (("roc", roc), ("pr", pr)):
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            pd.DataFrame({k: np.round(np.asarray(v, dtype=float), 6) for k, v in data.items()}).to_csv(tmp, index=False)
    auc = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    plot_curve(roc, "fpr", "tpr", out_dir / "roc.png", f"ROC ({label}): AUC {auc(metrics['roc_auc'])}", True)
    plot_curve(pr, "recall", "precision", out_dir / "pr.png", f"PR ({label}): AP {auc(metrics['pr_auc'])}", False)


def run(checkpoint_path: Path, manifest_path: Path, images_dir: Path, metrics_path: Path,
        predictions_path: Path, confusion_png: Path, batch_size: int = 32, workers: int = 4,
        positive_class: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, tta: str = "none") -> dict:
    """Score the checkpoint on the test split as it will be exported (`tta`: `export.tta`, see tasks/tta.py)."""
    t0 = time.time()
    model, ckpt = load_checkpoint(checkpoint_path)
    model = with_tta(model, tta)
    classes, pre = ckpt.classes, ckpt.preprocessing
    positive = positive_index(classes, positive_class)  # fail fast on a class the model does not know
    device = pick_device()
    model.to(device).to(memory_format=torch.channels_last)
    manifest = read_manifest(manifest_path)
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise ValueError(f"{manifest_path}: no 'test' images to evaluate on; check data.split.test")
    # decoded batch by batch as the model needs them: the test split is never in memory at once (docs/scale.md)
    images = DecodedOnDemand([Path(images_dir) / p for p in test["path"]], pre.size, workers, max_pixels)
    labels = split_labels(manifest, "test", classes)
    logits = predict_logits(model, images, pre.mean, pre.std, device, batch_size)
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    metrics = evaluation_metrics(labels.numpy(), probs.numpy(), classes, positive_class)  # CIs: 1000 resamples
    metrics["image_size"] = pre.size
    metrics["tta"] = tta
    metrics["seconds"] = round(time.time() - t0, 2)
    write_json(metrics_path, metrics)
    preds = pd.DataFrame({
        "path": test["path"].to_numpy(),
        "actual": [classes[i] for i in labels.tolist()],
        "predicted": [classes[i] for i in pred.tolist()],
        **{f"p_{c}": probs[:, i].numpy().round(6) for i, c in enumerate(classes)},
    })
    with atomic_path(predictions_path) as tmp:
        preds.to_csv(tmp, index=False)
    plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, confusion_png,
                   f"test: acc {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}")
    write_curves(labels.numpy(), probs.numpy(), positive, metrics, Path(confusion_png).parent)
    log.info("evaluate: %d test images: accuracy %.4f (95%% CI %.4f-%.4f), macro recall %.4f, macro F1 %.4f", len(test),
             metrics["accuracy"], *metrics["ci"]["accuracy"], metrics["macro_recall"], metrics["macro_f1"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_main("evaluate", __doc__, argv, _from_params)


def _from_params(p: Params, args: Namespace) -> None:
    out = args.out_dir
    run(args.checkpoint, args.manifest, args.images, out / "metrics.json", out / "predictions.csv",
        out / "confusion.png", batch_size=p.train.batch_size, workers=p.data.workers,
        positive_class=p.gates.positive_class, max_pixels=p.data.max_pixels, tta=p.export.tta)


if __name__ == "__main__":
    main()
