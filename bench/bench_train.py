"""Training throughput on this machine: our staged trainer (`tasks.train.fit`, feature cache on and
off) vs the plain PyTorch freeze-all-but-the-classifier loop, same model, data, size and threads.

All runs happen in one process, one after another, on the same data (a deterministic subsample of
the pipeline's train/val splits, of the installed ELPV set, or generated images) with the bundled
EfficientNet-Lite0 and a freshly seeded 2-class head:

  ours  frozen    `fit`, one stage trainable=head, cache_features=True   (the pipeline's default)
  ours  frozen    `fit`, the same stage, cache filled by PyTorch (prefix_runtime=torch; the others: ONNX Runtime)
  ours  frozen    `fit`, the same stage, cache_features=False            (same result, must agree)
  plain frozen    requires_grad=False but the classifier, DataLoader over a Dataset that flips/rotates
                  and normalises each uint8 image, model.train() and a full forward every batch, AdamW
  ours  unfrozen  `fit`, trainable=3 (last 3 blocks + head conv + head), cache on (ONNX Runtime, PyTorch) and off
  plain unfrozen  the same blocks unfrozen by hand, the same loop

    .venv/bin/python bench/bench_train.py                     # default: 8-23 min measured on 2 shared cores
    .venv/bin/python bench/bench_train.py --n-train 64 --n-val 32 --epochs 1 --size 96   # smoke
    .venv/bin/python bench/bench_train.py --synthetic --unfrozen-epochs 0

Prints a table and writes bench/results/bench_train.json; exits 1 when the cached and uncached
heads differ by more than --tolerance (both filled by PyTorch: ONNX Runtime's features differ by float
rounding, so that run's difference is reported, not checked). See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F
from common import cpu_name, stamp  # noqa: E402  (bench/ is on sys.path when run as a script)
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tasks import backbones as models
from tasks.entry import setup_logging
from tasks.files import write_json
from tasks.params import StageParams, TrainParams
from tasks.tensors import split_arrays
from tasks.train.augment import variants_for
from tasks.train.loop import Data, Split, fit
from tasks.train.staging import StagedModel

log = logging.getLogger("bench_train")
TARGET_RATIO = 1.0  # ours / plain images/s, frozen stage


# ---- data ---------------------------------------------------------------------------------------


def subsample(n_total: int, n: int, seed: int) -> np.ndarray:
    """Sorted, seeded choice of min(n, n_total) indices (0 = all)."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def synthetic_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey 'cells' with smooth shading; class 1 has a dark crack (a band at a random place/orientation)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(n, generator=g) % 2
    shade = F.interpolate(torch.rand((n, 1, 6, 6), generator=g), size=(size, size), mode="bilinear",
                          align_corners=False)
    x = 70 + 110 * shade + 12 * torch.randn((n, 1, size, size), generator=g)
    width = max(2, size // 40)
    for i in torch.nonzero(y).flatten().tolist():
        pos = int(torch.randint(size // 8, size - size // 8 - width, (1,), generator=g))
        if torch.rand(1, generator=g) < 0.5:
            x[i, :, pos : pos + width, :] -= 60
        else:
            x[i, :, :, pos : pos + width] -= 60
    return x.clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous(), y


def load_data(args) -> dict:
    """Train/val uint8 tensors (N, 3, S, S), labels, classes and where they came from."""
    manifest_path, images_dir = Path(args.manifest), Path(args.images)
    source = args.data
    if source == "auto":
        if manifest_path.exists() and images_dir.is_dir():
            source = "pipeline"
        else:
            try:
                import elpv_dataset  # noqa: F401

                source = "elpv"
            except ImportError:
                source = "synthetic"
    if source == "synthetic":
        x, y = synthetic_images(args.n_train + args.n_val, args.size, args.seed)
        return {"source": "synthetic (grey cells, class 1 with a dark crack)", "classes": ["ok", "crack"],
                "train": (x[: args.n_train], y[: args.n_train]), "val": (x[args.n_train :], y[args.n_train :])}
    from tasks.ingest import assign_splits
    from tasks.sources.elpv import elpv_root, elpv_table
    from tasks.manifest import read_manifest

    if source == "pipeline":
        manifest, where = read_manifest(manifest_path), f"pipeline manifest {manifest_path}"
    else:  # the installed ELPV package, split as `params.yaml` splits it (binary, stratified)
        manifest = elpv_table("binary", 0.5)
        manifest["split"] = assign_splits(manifest, 0.25, 0.10, ["probability", "type"], 42)
        images_dir, where = elpv_root() / "images", "installed elpv-dataset (binary, pipeline's split)"
    classes = sorted(manifest["label"].astype(str).unique())
    out = {"source": where, "classes": classes}
    for split, n, seed in (("train", args.n_train, args.seed), ("val", args.n_val, args.seed + 1)):
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        rows = rows.iloc[subsample(len(rows), n, seed)]
        out[split] = split_arrays(rows, images_dir, split, classes, args.size, args.workers)
    return out


# ---- the runs -----------------------------------------------------------------------------------


TORCH_PREFIX = "cache on, filled by PyTorch"


def fresh_model(base: nn.Module, n_classes: int, seed: int) -> nn.Module:
    return models.with_new_head(copy.deepcopy(base), n_classes, seed)


def run_ours(base, data, stage: StageParams, cache: bool, args, meta, prefix_runtime: str = "onnxruntime") -> dict:
    (tx, ty), (vx, vy) = data["train"], data["val"]
    model = fresh_model(base, len(data["classes"]), args.seed)
    params = TrainParams(image_size=args.size, cpu_image_size=args.size, batch_size=args.batch_size,
                         augment=args.augment, cache_features=cache, threads=args.threads, stages=[stage],
                         prefix_runtime=prefix_runtime)
    t0 = time.perf_counter()
    mean, std = meta["preprocessing"]["mean"], meta["preprocessing"]["std"]
    model, best, history = fit(model, Data(data["classes"], Split(tx, ty), Split(vx, vy)), params, mean, std,
                               args.seed, torch.device("cpu"))
    wall = time.perf_counter() - t0
    return {"model": model, "wall_s": wall, "images_per_s": len(tx) * stage.epochs / wall,
            "val_accuracy": history[-1]["val_accuracy"], "val_macro_f1": history[-1]["val_macro_f1"],
            "best": {k: v for k, v in best.items() if k != "val"} | {"val_accuracy": best["val"]["accuracy"]},
            "per_epoch": [{"epoch": h["epoch"], "seconds": round(h["seconds"], 2),
                        "images_per_s": round(h["images_per_s"], 2), "val_accuracy": h["val_accuracy"]}
                       for h in history]}


class AugmentedImages(Dataset):
    """What a typical user writes: per-image random flips/rot90 on the uint8 tensor, then normalise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: list[str]):
        self.images, self.labels, self.augment = images, labels, set(augment)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        if "hflip" in self.augment and torch.rand(1) < 0.5:
            x = x.flip(-1)
        if "vflip" in self.augment and torch.rand(1) < 0.5:
            x = x.flip(-2)
        if "rot90" in self.augment:
            x = torch.rot90(x, int(torch.randint(4, (1,))), dims=(1, 2))
        return (x.float() / 255 - self.mean) / self.std, self.labels[i]


def unfreeze_by_hand(model: nn.Module, trainable) -> list[str]:
    """The classic recipe: requires_grad=False everywhere, then True on the classifier (and the
    last N blocks + head conv of timm's EfficientNet, matching `trainable=N` in our trainer)."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [model.get_classifier()]
    if trainable != "head":
        modules += [*model.blocks[-int(trainable):], model.conv_head, model.bn2]
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def run_plain(base, data, stage: StageParams, args, meta) -> dict:
    (tx, ty), (vx, vy) = data["train"], data["val"]
    model = fresh_model(base, len(data["classes"]), args.seed)
    names = unfreeze_by_hand(model, stage.trainable)
    # same trainable set as our trainer's stage (checked on a copy, so this run stays untouched)
    probe = fresh_model(base, len(data["classes"]), args.seed)
    StagedModel(probe, stage.trainable, stage.bn)
    ours = sorted(n for n, p in probe.named_parameters() if p.requires_grad)
    if names != ours:
        raise SystemExit(f"plain loop unfreezes {len(names)} tensors, our stage {len(ours)}: fix unfreeze_by_hand")
    torch.manual_seed(args.seed)
    loader = DataLoader(AugmentedImages(tx, ty, meta["preprocessing"]["mean"], meta["preprocessing"]["std"], args.augment), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.plain_workers, generator=torch.Generator().manual_seed(args.seed),
                        persistent_workers=args.plain_workers > 0)
    val_loader = DataLoader(AugmentedImages(vx, vy, meta["preprocessing"]["mean"], meta["preprocessing"]["std"], []), batch_size=args.batch_size)
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) in head], "lr": stage.lr}]
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    if backbone:
        groups.append({"params": backbone, "lr": stage.lr * stage.backbone_lr_mult})
    optimizer = torch.optim.AdamW(groups, weight_decay=stage.weight_decay)
    epochs, acc = [], math.nan
    t0 = time.perf_counter()
    for epoch in range(stage.epochs):
        te = time.perf_counter()
        model.train()
        for x, y in tqdm(loader, desc=f"plain {stage.name} {epoch + 1}/{stage.epochs}", unit="batch", leave=False,
                         disable=None):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        acc = correct / len(vx)
        seconds = time.perf_counter() - te
        epochs.append({"epoch": epoch + 1, "seconds": round(seconds, 2), "images_per_s": round(len(tx) / seconds, 2),
                       "val_accuracy": acc})
        log.info("plain %s epoch %d/%d: val_acc %.4f (%.0fs, %.1f img/s)", stage.name, epoch + 1, stage.epochs, acc,
                 seconds, len(tx) / seconds)
    wall = time.perf_counter() - t0
    return {"model": model, "wall_s": wall, "images_per_s": len(tx) * stage.epochs / wall, "val_accuracy": acc,
            "per_epoch": epochs}


def warm_up(base, size: int, batch_size: int) -> None:
    """Untimed passes in each memory format and at batch sizes the runs use (1, the batch size,
    twice it for the trainer's validation batches), so the first timed run does not pay alone
    the first-call setup of the CPU kernels."""
    model = fresh_model(base, 2, 0)
    x = torch.randn(2 * batch_size, 3, size, size)
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = model.to(memory_format=fmt).train()
        m(x[:batch_size].contiguous(memory_format=fmt)).sum().backward()
        with torch.no_grad():
            for n in (1, batch_size, 2 * batch_size):
                m.eval()(x[:n].contiguous(memory_format=fmt))


def backbone_passes(kind: str, n_train: int, n_val: int, epochs: int, n_variants: int) -> int:
    """Images pushed through the frozen part: the cache computes each (image, variant) once; the
    trainer cycles each image through the variants, so a variant repeats only after n_variants epochs."""
    if kind == "cached":
        return n_train * min(epochs, n_variants) + n_val
    return (n_train + n_val) * epochs


def max_abs_diff(a: nn.Module, b: nn.Module, only=None) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if only is None or k.startswith(only)]
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in keys if sa[k].numel())


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["auto", "pipeline", "elpv", "synthetic"], default="auto",
                    help="auto (default): the pipeline's data/ if present, else the installed ELPV set, else synthetic")
    ap.add_argument("--synthetic", action="store_const", const="synthetic", dest="data", help="same as --data synthetic")
    ap.add_argument("--n-train", type=int, default=512, help="train images, seeded subsample (default 512; 0 = all)")
    ap.add_argument("--n-val", type=int, default=128, help="validation images, seeded subsample (default 128; 0 = all)")
    ap.add_argument("--size", type=int, default=224, help="image size in px (default 224, the pipeline's CPU size)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the frozen (head-only) runs (default 3)")
    ap.add_argument("--unfrozen-epochs", type=int, default=1,
                    help="epochs of the unfrozen runs, last 3 blocks (default 1; 0 skips them)")
    ap.add_argument("--unfrozen-blocks", type=int, default=3, help="blocks unfrozen in the unfrozen runs (default 3)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per step, every run (default 16)")
    ap.add_argument("--lr", type=float, default=3e-3, help="head learning rate of the frozen runs (default 3e-3)")
    ap.add_argument("--augment", nargs="*", default=["hflip", "vflip", "rot90"], choices=["hflip", "vflip", "rot90"],
                    help="augmentation, every run (default: hflip vflip rot90 = all 8 dihedral variants)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help=f"torch CPU threads, every run (default: torch's, here {torch.get_num_threads()})")
    ap.add_argument("--plain-workers", type=int, default=0, help="DataLoader workers of the plain loop (default 0)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="max |difference| allowed between the cached and uncached heads (default 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--manifest", default="data/validated.csv")
    ap.add_argument("--images", default="data/images")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads")
    ap.add_argument("--out", default=str(REPO / "bench/results/bench_train.json"))
    args = ap.parse_args(argv)
    setup_logging()
    logging.getLogger("tasks").setLevel(logging.WARNING)  # fit's per-epoch lines; the bench logs its own
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the train stage does on CPU
    t_start, load_before = time.time(), os.getloadavg()
    cores = os.cpu_count() or 1
    if load_before[0] + args.threads > cores + 0.5:
        log.warning("the machine is busy (load %.1f on %d cores): timings with %d threads are contended; compare "
                    "ratios from one run only, or use --threads %d", load_before[0], cores, args.threads,
                    max(1, int(cores - load_before[0])))

    base, meta = models.create("bundled", "efficientnet_lite0", "imagenet")
    data = load_data(args)
    n_train, n_val = len(data["train"][0]), len(data["val"][0])
    n_variants = len(variants_for(args.augment))
    log.info("data: %s; %d train / %d val images at %d px, classes %s, %d augmentation variants", data["source"],
             n_train, n_val, args.size, data["classes"], n_variants)
    warm_up(base, args.size, args.batch_size)

    frozen = StageParams(name="frozen", epochs=args.epochs, trainable="head", lr=args.lr, backbone_lr_mult=0.0, bn="eval")
    unfrozen = StageParams(name="unfrozen", epochs=args.unfrozen_epochs, trainable=args.unfrozen_blocks, lr=1e-3,
                           backbone_lr_mult=0.1, bn="eval", warmup_epochs=0.3)
    plan = [("ours", "frozen", "cache on", lambda: run_ours(base, data, frozen, True, args, meta)),
            ("ours", "frozen", TORCH_PREFIX, lambda: run_ours(base, data, frozen, True, args, meta, "torch")),
            ("ours", "frozen", "cache off", lambda: run_ours(base, data, frozen, False, args, meta)),
            ("plain", "frozen", "", lambda: run_plain(base, data, frozen, args, meta))]
    if args.unfrozen_epochs > 0:
        plan += [("ours", "unfrozen", "cache on", lambda: run_ours(base, data, unfrozen, True, args, meta)),
                 ("ours", "unfrozen", TORCH_PREFIX, lambda: run_ours(base, data, unfrozen, True, args, meta, "torch")),
                 ("ours", "unfrozen", "cache off", lambda: run_ours(base, data, unfrozen, False, args, meta)),
                 ("plain", "unfrozen", "", lambda: run_plain(base, data, unfrozen, args, meta))]
    runs, trained = [], {}
    for method, stage_name, variant, go in plan:
        name = f"{method} {stage_name}" + (f" ({variant})" if variant else "")
        log.info("run: %s", name)
        r = go()
        trained[name] = r.pop("model")
        epochs = args.epochs if stage_name == "frozen" else args.unfrozen_epochs
        kind = "cached" if variant.startswith("cache on") else "live"
        r.update(name=name, method=method, stage=stage_name, variant=variant, epochs=epochs,
                 backbone_passes=backbone_passes(kind, n_train, n_val, epochs, n_variants))
        log.info("%s: %.1f s, %.1f img/s, final val acc %.4f", name, r["wall_s"], r["images_per_s"], r["val_accuracy"])
        runs.append(r)
    by = {r["name"]: r for r in runs}

    # The cache's guarantee is exactness for features computed by the same runtime (PyTorch fills it in both runs);
    # ONNX Runtime's features differ by float rounding, so that difference is reported, not held to the tolerance.
    cached_name, uncached_name = f"ours frozen ({TORCH_PREFIX})", "ours frozen (cache off)"
    cached, uncached = trained[cached_name], trained[uncached_name]
    head_diff = max_abs_diff(cached, uncached, only="classifier")
    all_diff = max_abs_diff(cached, uncached)
    same_best = by[cached_name]["best"]["epoch"] == by[uncached_name]["best"]["epoch"]
    onnx_head_diff = max_abs_diff(trained["ours frozen (cache on)"], cached, only="classifier")
    ratios = {
        "frozen_cache_speedup": by["ours frozen (cache on)"]["images_per_s"] / by["ours frozen (cache off)"]["images_per_s"],
        "frozen_onnx_prefix_speedup": (by["ours frozen (cache on)"]["images_per_s"]
                                       / by[f"ours frozen ({TORCH_PREFIX})"]["images_per_s"]),
        "frozen_ours_vs_plain": by["ours frozen (cache on)"]["images_per_s"] / by["plain frozen"]["images_per_s"],
        "frozen_ours_uncached_vs_plain": by["ours frozen (cache off)"]["images_per_s"] / by["plain frozen"]["images_per_s"],
    }
    if "ours unfrozen (cache on)" in by:
        ratios["unfrozen_cache_speedup"] = (by["ours unfrozen (cache on)"]["images_per_s"]
                                            / by["ours unfrozen (cache off)"]["images_per_s"])
        ratios["unfrozen_onnx_prefix_speedup"] = (by["ours unfrozen (cache on)"]["images_per_s"]
                                                  / by[f"ours unfrozen ({TORCH_PREFIX})"]["images_per_s"])
        ratios["unfrozen_ours_vs_plain"] = by["ours unfrozen (cache on)"]["images_per_s"] / by["plain unfrozen"]["images_per_s"]
        unfrozen_diff = max_abs_diff(trained[f"ours unfrozen ({TORCH_PREFIX})"], trained["ours unfrozen (cache off)"])
    else:
        unfrozen_diff = None
    elapsed = time.time() - t_start
    out = {
        "setup": {"data": data["source"], "classes": data["classes"], "n_train": n_train, "n_val": n_val,
                  "image_size": args.size, "epochs_frozen": args.epochs, "epochs_unfrozen": args.unfrozen_epochs,
                  "unfrozen_blocks": args.unfrozen_blocks, "batch_size": args.batch_size, "augment": args.augment,
                  "augment_variants": n_variants, "plain_workers": args.plain_workers, "seed": args.seed,
                  "model": "efficientnet_lite0 (bundled ImageNet weights, new head)",
                  "stages": {"frozen": frozen.model_dump(), "unfrozen": unfrozen.model_dump()}},
        "machine": {"cpu": cpu_name(), "cores": cores, "threads": args.threads,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "torch": torch.__version__},
        **stamp(REPO),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "runs": runs,
        "ratios": ratios,
        "cache_equivalence": {"head_max_abs_diff": head_diff, "state_max_abs_diff": all_diff,
                              "same_best_epoch": same_best, "tolerance": args.tolerance,
                              "ok": head_diff <= args.tolerance, "onnx_prefix_head_max_abs_diff": onnx_head_diff,
                              "unfrozen_state_max_abs_diff": unfrozen_diff},
        "target": {"ours_vs_plain_frozen": f">= {TARGET_RATIO}x", "met": ratios["frozen_ours_vs_plain"] >= TARGET_RATIO},
        "seconds": round(elapsed, 1),
    }
    print_table(out)
    write_json(args.out, out)
    print(f"\nwritten: {args.out} ({elapsed:.0f} s)")
    if head_diff > args.tolerance:
        print(f"\nFAIL: the heads trained with and without the feature cache (filled by PyTorch) differ by {head_diff:.3g} "
              f"(> --tolerance {args.tolerance:g}); the cache must give the same model", file=sys.stderr)
        sys.exit(1)
    return out


def print_table(out: dict) -> None:
    s, m = out["setup"], out["machine"]
    print(f"\nTraining throughput on {m['cpu']} ({m['cores']} cores, {m['threads']} threads; load avg before "
          f"{m['loadavg_before'][0]}, after {m['loadavg_after'][0]}), torch {m['torch']}")
    print(f"{s['n_train']} train / {s['n_val']} val images from {s['data']}, {s['image_size']} px, batch "
          f"{s['batch_size']}, augment {' '.join(s['augment']) or 'none'} ({s['augment_variants']} variants), "
          f"Lite0 + new head\n")
    print("| method | stage | epochs | backbone passes | images/s | wall s | val acc |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in out["runs"]:
        method = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        stage = "head only" if r["stage"] == "frozen" else f"last {s['unfrozen_blocks']} blocks + head"
        print(f"| {method} | {stage} | {r['epochs']} | {r['backbone_passes']} | {r['images_per_s']:.1f} | "
              f"{r['wall_s']:.1f} | {100 * r['val_accuracy']:.1f}% |")
    q, c = out["ratios"], out["cache_equivalence"]
    print("\n| ratio (images/s) | value |\n| --- | --- |")
    print(f"| frozen: cache on / cache off | {q['frozen_cache_speedup']:.2f}x |")
    print(f"| frozen: cache filled by ONNX Runtime / by PyTorch | {q['frozen_onnx_prefix_speedup']:.2f}x |")
    print(f"| frozen: ours / plain (target >= {TARGET_RATIO}x) | {q['frozen_ours_vs_plain']:.2f}x "
          f"({'met' if out['target']['met'] else 'NOT met'}) |")
    print(f"| frozen: ours without cache / plain | {q['frozen_ours_uncached_vs_plain']:.2f}x |")
    if "unfrozen_ours_vs_plain" in q:
        print(f"| unfrozen: cache on / cache off | {q['unfrozen_cache_speedup']:.2f}x |")
        print(f"| unfrozen: cache filled by ONNX Runtime / by PyTorch | {q['unfrozen_onnx_prefix_speedup']:.2f}x |")
        print(f"| unfrozen: ours / plain | {q['unfrozen_ours_vs_plain']:.2f}x |")
    print(f"\ncache on (filled by PyTorch) vs off: max |head difference| {c['head_max_abs_diff']:.2e} (tolerance "
          f"{c['tolerance']:g}: {'ok' if c['ok'] else 'FAIL'}), whole model {c['state_max_abs_diff']:.2e}, same best "
          f"epoch: {c['same_best_epoch']}")
    print(f"cache filled by ONNX Runtime vs by PyTorch (informational: float rounding of the features): max |head "
          f"difference| {c['onnx_prefix_head_max_abs_diff']:.2e}")
    if c["unfrozen_state_max_abs_diff"] is not None:
        print(f"unfrozen cache on (filled by PyTorch) vs off (informational, trained blocks too): max |difference| "
              f"{c['unfrozen_state_max_abs_diff']:.2e}")
    print("images/s = train images x epochs / wall time of the whole run (every epoch's validation pass included); "
          "backbone passes = images through the frozen layers (train + val)")


if __name__ == "__main__":
    main()
