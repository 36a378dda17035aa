"""Lightning's recipe: a LightningModule with a `backbone` attribute and Lightning's `BackboneFinetuning` callback.

The project's model (bundled Lite0 + the same seeded fresh head as every run, see peer_common.py) split into
`backbone` (the timm model with its classifier replaced by Identity: pooled features) and `head` (the classifier).
`BackboneFinetuning(unfreeze_backbone_at_epoch=frozen_epochs)` freezes the backbone before training (BatchNorm
layers stay trainable: `train_bn=True`) and at that epoch adds it to the optimizer at 0.1x the current lr, raised
1.5x per epoch (the callback's defaults). Optimizer: Adam lr 1e-3 over the trainable parameters, as in the
callback's documentation. Data: a Dataset that decodes each file, a random dihedral variant (flips + 90-degree
rotations), normalise; DataLoaders with shuffle. The final weights are tested (no checkpoint callback).

    bench/.venv-peers/bin/python bench/peers/lightning_backbone_finetuning.py --input bench/results/peers/input \
        --out bench/results/peers/lightning --frozen-epochs 1 --unfrozen-epochs 2 --threads 2
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning
from peer_common import (
    FileImages,
    build_model,
    finish,
    load_inputs,
    parser,
    set_threads,
)
from torch import nn
from torch.utils.data import DataLoader

LR = 1e-3


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.classifier
        model.classifier = nn.Identity()
        self.backbone = model
        self.epochs, self._t = [], 0.0

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=LR)

    def on_train_epoch_start(self):
        self._t = time.perf_counter()

    def on_train_epoch_end(self):
        acc = float(self.trainer.callback_metrics.get("val_acc", float("nan")))
        self.epochs.append({"epoch": len(self.epochs) + 1, "seconds": round(time.perf_counter() - self._t, 2),
                            "val_accuracy": acc})
        print(f"lightning epoch {len(self.epochs)}: val accuracy {acc:.4f} ({self.epochs[-1]['seconds']} s)", flush=True)


def main() -> None:
    t_process = time.time()
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    set_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    rows, info = load_inputs(args.input)
    module = Classifier(build_model(args.input, info))
    classes, size, mean, std = info["classes"], info["size"], info["mean"], info["std"]

    def loader(split: str, augment: bool, shuffle: bool) -> DataLoader:
        return DataLoader(FileImages(rows[rows["split"] == split], classes, size, mean, std, augment),
                          batch_size=args.batch_size, shuffle=shuffle, num_workers=args.workers)

    t0 = time.perf_counter()
    trainer = L.Trainer(max_epochs=args.frozen_epochs + args.unfrozen_epochs, accelerator="auto", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=args.out,
                        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=args.frozen_epochs, train_bn=True)])
    trainer.fit(module, loader("train", True, True), loader("val", False, False))
    wall = time.perf_counter() - t0
    pred = torch.cat(trainer.predict(module, loader("test", False, False))).tolist()
    finish(args, "Lightning BackboneFinetuning", f"BackboneFinetuning(unfreeze_backbone_at_epoch={args.frozen_epochs}), "
           f"Adam {LR}, final weights", info, rows, pred, wall, module.epochs, ("lightning",), t_process,
           accelerator=str(trainer.strategy.root_device))


if __name__ == "__main__":
    main()
