"""What every peer script shares: the prepared input folder, the model, decoding, augmentation, scoring, output.

Standalone on purpose: imports torch, timm, PIL, numpy and pandas only, never the project, so the peers run in
their own environment (bench/.venv-peers) and the project's dependencies never see fastai or Lightning.

How a peer gets *the same* model as the pipeline. The project builds its bundled EfficientNet-Lite0 as timm's
`efficientnet_lite0` with `bn_eps=1e-3` (tasks/backbones/timm_models.py), loads the bundled ImageNet weights and
swaps in a seeded fresh head (`with_new_head`). The driver (bench/bench_peers.py) does exactly that, then saves the
module's `state_dict` (`model.pt`), the timm constructor arguments (`model.json`) and one reference batch with the
logits the project's module gives for it (`reference.pt`). A peer rebuilds the architecture with the same timm
release (pinned in requirements.txt to the project's), loads the state_dict with `strict=True` and checks the
reference logits (max |difference| <= 1e-4) before training: same architecture, same weights, same head, verified.
Why not TorchScript: a scripted module hides the submodules fastai's splitter and Lightning's `backbone` attribute
need, and `torch.jit` is deprecated; why not import the project's backbone module: it pulls the project's own
dependencies (pydantic, fsspec...) into the peers' environment, and timm alone is all the architecture needs.

The input folder:
    images.csv     file (absolute path), label, split (train / val / test)
    model.json     arch, timm_kwargs, classes, mean, std, size, seed, timm version
    model.pt       the state_dict (bundled weights + the seeded fresh head)
    reference.pt   {"input": float tensor, "logits": the project's module's logits for it, eval mode}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

REFERENCE_TOLERANCE = 1e-4


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", type=Path, required=True, help="the prepared input folder (bench/bench_peers.py writes it)")
    ap.add_argument("--out", type=Path, required=True, help="output folder: result.json and predictions.csv")
    ap.add_argument("--frozen-epochs", type=int, default=1, help="epochs with only the head trained")
    ap.add_argument("--unfrozen-epochs", type=int, default=2, help="epochs after unfreezing")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (torch.set_num_threads)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: decode in this process)")
    ap.add_argument("--seed", type=int, default=42)
    return ap


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # for DataLoader workers started later


def load_inputs(folder: Path) -> tuple[pd.DataFrame, dict]:
    rows = pd.read_csv(folder / "images.csv", dtype=str, keep_default_na=False)
    info = json.loads((folder / "model.json").read_text())
    return rows, info


def build_model(folder: Path, info: dict) -> nn.Module:
    """timm's architecture + the driver's state_dict, checked against the project's own logits."""
    import timm

    model = timm.create_model(info["arch"], pretrained=False, num_classes=len(info["classes"]), **info["timm_kwargs"])
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True), strict=True)
    ref = torch.load(folder / "reference.pt", map_location="cpu", weights_only=True)
    model.eval()
    with torch.no_grad():
        diff = float((model(ref["input"]) - ref["logits"]).abs().max())
    if diff > REFERENCE_TOLERANCE:
        raise SystemExit(f"the rebuilt model differs from the project's (max |logit difference| {diff:.3g} > "
                         f"{REFERENCE_TOLERANCE}): timm {timm.__version__} here, {info.get('timm')} in the project")
    info["reference_max_abs_diff"] = diff
    return model.train()  # as a freshly built model comes: each library sets the modes it wants


def decode(path: str, size: int) -> torch.Tensor:
    """uint8 (3, size, size): RGB, squashed with bilinear resampling (the project's decode, tasks/images.py)."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/90-degree rotations of a (C, H, W) image: k in 0..7."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


class FileImages(Dataset):
    """What a user of plain PyTorch / Lightning writes: decode each file when asked, augment, normalise."""

    def __init__(self, rows: pd.DataFrame, classes: list[str], size: int, mean, std, augment: bool):
        self.files = rows["file"].tolist()
        self.labels = [classes.index(c) for c in rows["label"]]
        self.size, self.augment = size, augment
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        x = decode(self.files[i], self.size)
        if self.augment:
            x = dihedral(x, int(torch.randint(8, (1,))))
        return (x.float() / 255 - self.mean) / self.std, self.labels[i]


def scores(y_true, y_pred, k: int) -> dict:
    """Accuracy, macro recall and macro F1 (the driver recomputes them with the project's metrics)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recall, f1 = [], []
    for c in range(k):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        support, predicted = int((y_true == c).sum()), int((y_pred == c).sum())
        r = tp / support if support else 0.0
        p = tp / predicted if predicted else 0.0
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
            "macro_recall": float(np.mean(recall)), "macro_f1": float(np.mean(f1)), "n": int(len(y_true))}


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", *names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def finish(args, name: str, recipe: str, info: dict, rows: pd.DataFrame, test_pred: list[int], wall_s: float,
           epochs: list[dict], libs: tuple[str, ...], t_process: float, **extra) -> dict:
    """Write predictions.csv (path, actual, predicted) and result.json; print one line."""
    classes = info["classes"]
    test = rows[rows["split"] == "test"]
    y_true = [classes.index(c) for c in test["label"]]
    n_train = int((rows["split"] == "train").sum())
    total_epochs = args.frozen_epochs + args.unfrozen_epochs
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"file": test["file"].to_numpy(), "actual": test["label"].to_numpy(),
                  "predicted": [classes[i] for i in test_pred]}).to_csv(args.out / "predictions.csv", index=False)
    result = {
        "name": name, "recipe": recipe,
        "setup": {"size": info["size"], "batch_size": args.batch_size, "frozen_epochs": args.frozen_epochs,
                  "unfrozen_epochs": args.unfrozen_epochs, "threads": args.threads,
                  "threads_in_fit": torch.get_num_threads(), "workers": args.workers, "seed": args.seed,
                  "n_train": n_train, "n_val": int((rows["split"] == "val").sum()), "n_test": len(test),
                  "augment": "dihedral (flips + 90-degree rotations)",
                  "reference_max_abs_diff": info.get("reference_max_abs_diff")},
        "wall_s": round(wall_s, 2), "images_per_s": round(n_train * total_epochs / wall_s, 2) if wall_s else None,
        "test": scores(y_true, test_pred, len(classes)), "epochs": epochs, "versions": versions(*libs),
        "process_s": round(time.time() - t_process, 1), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **extra,
    }
    tmp = args.out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out / "result.json")
    print(f"{name}: {wall_s:.1f} s, {result['images_per_s']} img/s, test accuracy {result['test']['accuracy']:.4f}, "
          f"macro F1 {result['test']['macro_f1']:.4f}", flush=True)
    return result
