"""Evaluate stage: the best checkpoint on the held-out test split -> DVC metrics and plots.

Writes `metrics.json` (accuracy, macro recall, macro F1, per-class scores), the per-image
predictions (`predictions.csv`, also DVC's confusion-matrix plot data) and a confusion
matrix PNG. Preprocessing comes from the checkpoint, never from params, so evaluation sees
exactly what training saw.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch

from tasks.data import split_arrays
from tasks.ingest import read_manifest
from tasks.io import atomic_path, write_json
from tasks.metrics import bootstrap_ci, classification_metrics, confusion
from tasks.train import load_checkpoint, pick_device, predict_logits

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


def run(checkpoint_path: Path, manifest_path: Path, images_dir: Path, metrics_path: Path,
        predictions_path: Path, confusion_png: Path, batch_size: int = 32, workers: int = 4) -> dict:
    t0 = time.time()
    model, ckpt = load_checkpoint(checkpoint_path)
    classes, pre = ckpt["classes"], ckpt["preprocessing"]
    device = pick_device()
    model.to(device).to(memory_format=torch.channels_last)
    manifest = read_manifest(manifest_path)
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise ValueError(f"{manifest_path}: no 'test' images to evaluate on; check data.split.test")
    images, labels = split_arrays(manifest, images_dir, "test", classes, pre["size"], workers)
    logits = predict_logits(model, images, pre["mean"], pre["std"], device, batch_size)
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    metrics = classification_metrics(labels.numpy(), pred.numpy(), classes)
    metrics["ci"] = bootstrap_ci(labels.numpy(), pred.numpy(), len(classes))  # 95%, 1000 resamples
    metrics["classes"] = classes
    metrics["image_size"] = pre["size"]
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
    plot_confusion(confusion(labels.numpy(), pred.numpy(), len(classes)), classes, confusion_png,
                   f"test: acc {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}")
    log.info("evaluate: %d test images: accuracy %.4f (95%% CI %.4f-%.4f), macro recall %.4f, macro F1 %.4f", len(test),
             metrics["accuracy"], *metrics["ci"]["accuracy"], metrics["macro_recall"], metrics["macro_f1"])
    return metrics
