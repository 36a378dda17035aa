"""fastai's recipe: a Learner over a DataBlock, `Learner.fine_tune(epochs, base_lr, freeze_epochs)`.

What `vision_learner` would build, minus its own new head: the project's model (bundled Lite0 + the same seeded
fresh head as every run, see peer_common.py) with a body/head `splitter`, so `fine_tune` freezes the body (BatchNorm
layers stay trainable: fastai's `train_bn=True`), trains the head for `freeze_epochs` with one-cycle, unfreezes and
trains everything for `epochs` with discriminative learning rates (fastai's defaults: base_lr 2e-3, lr_mult 100,
pct_start 0.3, div 5, Adam). No learning-rate finder: the fixed base_lr. Data: DataBlock(ImageBlock,
CategoryBlock), `Resize(size, squish)` per item, `Dihedral(p=1)` (one of the 8 flips/90-degree rotations per image)
and `Normalize` per batch. The Learner's final weights are tested (fastai keeps no best epoch by default).

    bench/.venv-peers/bin/python bench/peers/fastai_fine_tune.py --input bench/results/peers/input \
        --out bench/results/peers/fastai --frozen-epochs 1 --unfrozen-epochs 2 --threads 2
"""

from __future__ import annotations

import time

# the usual `from fastai.vision.all import *`, by name (importing it also patches in fine_tune, fit_one_cycle, no_bar)
from fastai.vision.all import (
    Callback,
    CategoryBlock,
    ColReader,
    ColSplitter,
    CrossEntropyLossFlat,
    DataBlock,
    Dihedral,
    ImageBlock,
    Learner,
    Normalize,
    Resize,
    ResizeMethod,
    accuracy,
    set_seed,
)
from peer_common import build_model, finish, load_inputs, parser, set_threads

BASE_LR = 2e-3  # fine_tune's default


class EpochLog(Callback):
    """Per-epoch wall time and validation accuracy across both of fine_tune's fits."""

    order = 60  # after the Recorder has its values

    def __init__(self):
        self.rows, self.t = [], 0.0

    def before_epoch(self):
        self.t = time.perf_counter()

    def after_epoch(self):
        value = self.recorder.log[list(self.recorder.metric_names).index("accuracy")]
        if not isinstance(value, float):  # get_preds' pass, not an epoch of fine_tune
            return
        self.rows.append({"epoch": len(self.rows) + 1, "seconds": round(time.perf_counter() - self.t, 2),
                          "val_accuracy": value})
        print(f"fastai epoch {len(self.rows)}: val accuracy {self.rows[-1]['val_accuracy']:.4f} "
              f"({self.rows[-1]['seconds']} s)", flush=True)


def main() -> None:
    t_process = time.time()
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    set_threads(args.threads)
    set_seed(args.seed, reproducible=True)
    rows, info = load_inputs(args.input)
    model = build_model(args.input, info)
    classes, size = info["classes"], info["size"]
    t0 = time.perf_counter()
    df = rows[rows["split"] != "test"].reset_index(drop=True)
    df["is_valid"] = df["split"] == "val"
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=classes)), get_x=ColReader("file"),
                      get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                      item_tfms=Resize(size, method=ResizeMethod.Squish),
                      batch_tfms=[Dihedral(p=1.0), Normalize.from_stats(info["mean"], info["std"])])
    dls = block.dataloaders(df, bs=args.batch_size, num_workers=args.workers)

    def splitter(m):
        head = {id(p) for p in m.classifier.parameters()}
        return [[p for p in m.parameters() if id(p) not in head], list(m.classifier.parameters())]

    log = EpochLog()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=splitter,
                    path=args.out, cbs=[log])
    with learn.no_bar():
        learn.fine_tune(args.unfrozen_epochs, base_lr=BASE_LR, freeze_epochs=args.frozen_epochs)
    wall = time.perf_counter() - t0
    test_dl = dls.test_dl(rows[rows["split"] == "test"].reset_index(drop=True))
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=test_dl)
    finish(args, "fastai fine_tune", f"Learner.fine_tune({args.unfrozen_epochs}, base_lr={BASE_LR}, "
           f"freeze_epochs={args.frozen_epochs}); Dihedral(p=1), final weights", info, rows,
           probs.argmax(1).tolist(), wall, log.rows, ("fastai", "fastcore"), t_process)


if __name__ == "__main__":
    main()
