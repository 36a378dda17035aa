"""Which epoch's weights should training keep? Selection rules judged out of sample, on validation only.

Trains the default recipe (params.yaml's `train`) once per seed with the pipeline's own train stage, recording
every epoch's validation probabilities (and the average of the last 3 epochs' weights, SWA-style). Then, for many
random halvings of the validation split (stratified by label), each rule picks its weights on one half and is
scored on the other, both ways: an out-of-sample estimate of what each rule keeps, without the test split.

    .venv/bin/python bench/bench_selection.py                    # 5 seeds: ~32 min on 2 idle cores
    .venv/bin/python bench/bench_selection.py --seeds 42 7 --reuse   # rescore saved runs only

Prints a table and writes bench/results/selection.json (per-epoch probabilities under bench/results/selection/).
Needs data/validated.csv, data/images and models/base (made with `finetune stage ...` when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import ensure_pipeline_inputs, provenance  # noqa: E402  (bench/ is on sys.path as a script)

from tasks.entry import setup_logging  # noqa: E402
from tasks.files import write_json  # noqa: E402
from tasks.params import TrainParams, augmentations, load_params  # noqa: E402

log = logging.getLogger("bench_selection")
MANIFEST, IMAGES, BASE = REPO / "data/validated.csv", REPO / "data/images", REPO / "models/base"
OUT = REPO / "bench/results/selection"
RULES = ["best macro_f1", "best accuracy", "lowest loss", "last", "swa3"]
SWA_K = 3


@contextlib.contextmanager
def recording(store: dict):
    """Wrap the trainer's `fit` so each epoch's validation probabilities (and, at the end, those of the last
    SWA_K epochs' averaged weights) land in `store`; the training itself is unchanged."""
    import torch

    from tasks.tensors import predict_logits
    from tasks.train import stage

    original = stage.fit

    def fit(model, data, params, mean, std, seed, device, *args, on_epoch=None, **kwargs):
        snapshots = []

        def probabilities():
            with torch.no_grad():
                return predict_logits(model.eval(), data.val.images, mean, std, device, 32).softmax(1).numpy()

        def hook(history):
            store.setdefault("val_accuracy", []).append(history[-1]["val_accuracy"])
            store.setdefault("probs", []).append(probabilities())  # the next epoch puts its own modes back
            if history[-1]["stage"] == params.stages[-1].name:
                snapshots[:] = [*snapshots[-(SWA_K - 1):], copy.deepcopy(model.state_dict())]
            if on_epoch is not None:
                on_epoch(history)

        result = original(model, data, params, mean, std, seed, device, *args, on_epoch=hook, **kwargs)
        kept = copy.deepcopy(model.state_dict())
        model.load_state_dict({k: (sum(s[k].double() for s in snapshots) / len(snapshots)).to(v.dtype)
                               if v.dtype.is_floating_point else v for k, v in snapshots[-1].items()})
        store["swa"] = probabilities()
        store["labels"] = data.val.labels.numpy()
        model.load_state_dict(kept)
        return result

    stage.fit = fit
    try:
        yield
    finally:
        stage.fit = original


def train_seed(train: TrainParams, seed: int, workers: int) -> Path:
    from tasks.train import stage as train_stage

    out = OUT / f"seed{seed}"
    store: dict = {}
    t0 = time.time()
    with recording(store):
        train_stage.run(MANIFEST, IMAGES, BASE, train, seed, out / "model.pt", out / "summary.json",
                        out / "history.csv", workers=workers)
    recomputed = [float((p.argmax(1) == store["labels"]).mean()) for p in store["probs"]]
    if max(abs(a - b) for a, b in zip(recomputed, store["val_accuracy"])) > 1.5 / len(store["labels"]):
        raise SystemExit(f"recorded validation probabilities disagree with the trainer's: {recomputed} vs "
                         f"{store['val_accuracy']}")
    path = out / "epochs.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, probs=np.stack(store["probs"]), swa=store["swa"], labels=store["labels"],
             train_s=time.time() - t0)
    os.replace(tmp, path)
    return path


def scores(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    pred = probs.argmax(1)
    return float((pred == labels).mean()), float(f1_score(labels, pred, average="macro"))


def loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def kept_by(rule: str, probs: np.ndarray, swa: np.ndarray, labels: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The validation probabilities of the weights `rule` keeps, choosing on the rows `pick` (the trainer's
    tie-break: the first best epoch)."""
    if rule == "last":
        return probs[-1]
    if rule == "swa3":
        return swa
    if rule == "lowest loss":
        values = [-loss(p[pick], labels[pick]) for p in probs]
    else:
        values = [scores(p[pick], labels[pick])[0 if rule == "best accuracy" else 1] for p in probs]
    return probs[int(np.argmax(values))]


def judge(path: Path, halvings: int, seed: int) -> dict:
    d = np.load(path)
    probs, swa, labels = d["probs"], d["swa"], d["labels"]
    rng = np.random.default_rng(seed)
    got = {rule: [] for rule in RULES}
    for _ in range(halvings):
        half = np.zeros(len(labels), bool)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            half[rng.permutation(rows)[: len(rows) // 2]] = True
        for pick, judged in ((half, ~half), (~half, half)):
            for rule in RULES:
                got[rule].append(scores(kept_by(rule, probs, swa, labels, pick)[judged], labels[judged]))
    return {"epochs": len(probs), "train_s": round(float(d["train_s"]), 1), "n_val": len(labels),
            "rules": {rule: dict(zip(("accuracy", "macro_f1"), np.mean(v, 0).round(6).tolist()))
                      for rule, v in got.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1, 2, 3])
    ap.add_argument("--halvings", type=int, default=200, help="random validation halvings per seed (default 200)")
    ap.add_argument("--reuse", action="store_true", help="rescore saved epochs.npz files instead of training")
    args = ap.parse_args()
    setup_logging()
    load_before = os.getloadavg()
    params = load_params(args.params)
    ensure_pipeline_inputs(REPO, args.params, log)
    train = params.train.model_copy(update={"augment": augmentations(params.data, params.train)})
    per_seed = {}
    for seed in args.seeds:
        path = OUT / f"seed{seed}" / "epochs.npz"
        if not (args.reuse and path.exists()):
            log.info("seed %d: training the default recipe, recording every epoch's validation probabilities", seed)
            path = train_seed(train, seed, params.data.workers)
        per_seed[seed] = judge(path, args.halvings, seed)
    summary = {}
    for rule in RULES:
        acc = np.array([s["rules"][rule]["accuracy"] for s in per_seed.values()])
        f1 = np.array([s["rules"][rule]["macro_f1"] for s in per_seed.values()])
        ddof = 1 if len(acc) > 1 else 0
        summary[rule] = {"accuracy": round(float(acc.mean()), 6), "accuracy_sd": round(float(acc.std(ddof=ddof)), 6),
                         "macro_f1": round(float(f1.mean()), 6), "macro_f1_sd": round(float(f1.std(ddof=ddof)), 6)}
    command = "python bench/bench_selection.py " + " ".join(sys.argv[1:])
    write_json(REPO / "bench/results/selection.json", {
        **provenance(REPO, command.strip(), load_before=load_before), "halvings": args.halvings,
        "seeds": {str(k): v for k, v in per_seed.items()}, "summary": summary})
    print(f"\n{'kept weights':16} {'accuracy (other half)':>24} {'macro F1':>16}   per seed (accuracy)")
    for rule in RULES:
        s = summary[rule]
        seeds = " ".join(f"{per_seed[k]['rules'][rule]['accuracy']:.4f}" for k in per_seed)
        print(f"{rule:16} {s['accuracy']:13.4f} (sd {s['accuracy_sd']:.4f}) {s['macro_f1']:8.4f} (sd "
              f"{s['macro_f1_sd']:.4f})   {seeds}")
    print(f"\nwrote {REPO / 'bench/results/selection.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
