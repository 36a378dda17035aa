"""The classic PyTorch transfer-learning recipe ("ConvNet as fixed feature extractor", PyTorch's
transfer-learning tutorial): the pretrained net with every parameter frozen but the classifier, SGD lr 0.001
momentum 0.9 with StepLR(7, 0.1), `model.train()` while training, a validation pass per epoch, and the weights
of the best validation accuracy kept for the test.

The head is trained for the whole budget (frozen + unfrozen epochs): the classic recipe never unfreezes.
Data: a Dataset that decodes each file when asked, random dihedral variant (flips + 90-degree rotations),
normalise; a DataLoader with shuffle. Needs torch, timm, PIL, pandas: runs in the project's environment or the
peers'.

    python bench/peers/plain_loop.py --input bench/results/peers/input --out bench/results/peers/plain
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from peer_common import (
    FileImages,
    build_model,
    finish,
    load_inputs,
    parser,
    set_threads,
)
from torch.utils.data import DataLoader


def main() -> None:
    t_process = time.time()
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    rows, info = load_inputs(args.input)
    model = build_model(args.input, info)
    classes, size, mean, std = info["classes"], info["size"], info["mean"], info["std"]
    t0 = time.perf_counter()
    train = DataLoader(FileImages(rows[rows["split"] == "train"], classes, size, mean, std, augment=True),
                       batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                       generator=torch.Generator().manual_seed(args.seed))
    val = DataLoader(FileImages(rows[rows["split"] == "val"], classes, size, mean, std, augment=False),
                     batch_size=args.batch_size, num_workers=args.workers)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(model.get_classifier().parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_acc, best = -1.0, None
    epochs = []
    for epoch in range(args.frozen_epochs + args.unfrozen_epochs):
        te = time.perf_counter()
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((model(x).argmax(1) == y).sum())
        acc = correct / len(val.dataset)
        if acc > best_acc:
            best_acc, best = acc, copy.deepcopy(model.state_dict())
        epochs.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - te, 2), "val_accuracy": acc})
        print(f"plain epoch {epoch + 1}: val accuracy {acc:.4f} ({epochs[-1]['seconds']} s)", flush=True)
    wall = time.perf_counter() - t0
    model.load_state_dict(best)
    model.eval()
    test = DataLoader(FileImages(rows[rows["split"] == "test"], classes, size, mean, std, augment=False),
                      batch_size=args.batch_size, num_workers=args.workers)
    with torch.no_grad():
        pred = [int(i) for x, _ in test for i in model(x).argmax(1)]
    finish(args, "plain PyTorch loop", "classic: freeze all but the classifier, SGD 0.001 momentum 0.9, StepLR(7, 0.1), "
           "best val accuracy kept", info, rows, pred, wall, epochs, (), t_process)


if __name__ == "__main__":
    main()
