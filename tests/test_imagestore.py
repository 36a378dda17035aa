"""Training from disk: the decoded-image store and the spilled feature cache give the same weights as memory,
bit for bit; the memory budget places data and refuses a run that cannot fit before it starts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks import backbones
from tasks.files import sha256_file, write_json
from tasks.params import StageParams
from tasks.tensors import split_arrays
from tasks.train import state as saved_state
from tasks.train.budget import plan
from tasks.train.imagestore import ImageStore, build, split_store
from tasks.train.loop import Data, Saving, Split
from tasks.train.loop import fit as fit_
from tasks.train.rowfile import RowFile
from tasks.train.runtime import TrainingError
from tests.conftest import make_dataset
from tests.test_train import MEAN, STD, Interrupt, base, fresh, params, toy, two_stages  # noqa: F401


def test_rows_come_back_in_any_order_and_np_memmap_reads_the_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (10, 3, 4, 4), dtype=np.uint8)
    rows = RowFile(tmp_path / "x.u8", 10, (3, 4, 4), np.uint8, create=True)
    rows.write([3, 4, 5, 0, 9, 1, 2, 6, 7, 8], data[[3, 4, 5, 0, 9, 1, 2, 6, 7, 8]])
    idx = [7, 2, 3, 3, 9, 0]
    assert np.array_equal(rows.read(idx), data[idx])
    assert np.array_equal(np.memmap(tmp_path / "x.u8", np.uint8, "r", shape=(10, 3, 4, 4)), data)
    with pytest.raises(IndexError):
        rows.read([10])


def manifest_of(folder, split_of=lambda i: "train" if i % 3 else "val") -> pd.DataFrame:
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    return pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths],
                         "split": [split_of(i) for i in range(len(paths))],
                         "sha256": [sha256_file(folder / p) for p in paths]})


def test_the_store_holds_what_decoding_gives_and_is_built_once_per_data_version(tmp_path, caplog):
    images = make_dataset(tmp_path / "images", per_class=6, size=40)
    manifest, root = manifest_of(images), tmp_path / "cache"
    in_ram, _ = split_arrays(manifest, images, "train", ["bright", "dark"], 32)
    with caplog.at_level(logging.INFO, logger="tasks.train.imagestore"):
        store = split_store(manifest, images, "train", 32, workers=2, root=root)
        again = split_store(manifest, images, "train", 32, workers=2, root=root)
    assert store.shape == tuple(in_ram.shape) and torch.equal(store[torch.arange(len(store))], in_ram)
    assert again.folder == store.folder and sum("decoding" in r.message for r in caplog.records) == 1
    idx = torch.tensor([5, 0, 5, 2])
    assert torch.equal(store[idx], in_ram[idx]) and torch.equal(store[2:5], in_ram[2:5])
    assert sorted(p.name for p in store.folder.iterdir()) == ["header.json", "images.u8"]
    assert split_store(manifest, images, "train", 40, root=root).folder != store.folder  # another size
    changed = manifest.assign(sha256=manifest["sha256"].where(manifest.index != 1, "0" * 64))
    assert split_store(changed, images, "train", 32, root=root).folder != store.folder  # another data version
    assert not [p for p in root.rglob("*.tmp")]  # temps renamed into place


def store_of(x: torch.Tensor, folder) -> ImageStore:
    return build(folder, len(x), x.shape[-1], lambda a, b: x[a:b].numpy(), key="test")


def fit_on(weights, x, y, vx, vy, p, seed=3, store_dir=None, spill=None, **kw):
    if store_dir is not None:
        x, vx = store_of(x, store_dir / "train"), store_of(vx, store_dir / "val")
        assert isinstance(x, ImageStore)
    data = Data(["a", "b"], Split(x, y), Split(vx, vy), feature_spill=spill)
    return fit_(fresh(weights), data, p, MEAN, STD, seed, torch.device("cpu"), **kw)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cache, spill", [(False, False), (True, False), (True, True)],
                         ids=["no-feature-cache", "feature-cache-in-ram", "feature-cache-on-disk"])
def test_training_from_the_store_gives_bit_identical_weights(base, tmp_path, cache, spill):  # noqa: F811
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    p = two_stages(cache_features=cache)  # the head on pooled features, then 2 blocks on a spatial cache
    in_ram, best, history = fit_on(base, x, y, vx, vy, p)
    on_disk, best_d, history_d = fit_on(base, x, y, vx, vy, p, store_dir=tmp_path, spill=tmp_path if spill else None)
    assert same_weights(in_ram, on_disk)
    assert [h["val_loss"] for h in history] == [h["val_loss"] for h in history_d] and best == best_d


def test_a_low_resolution_stage_from_the_store_is_identical_too(base, tmp_path):  # noqa: F811
    x, y = toy(n=16, size=96)
    p = params(StageParams(name="small", epochs=1, trainable="head", lr=3e-2, image_scale=0.67),
               StageParams(name="full", epochs=1, trainable=1, lr=1e-3)).model_copy(
        update={"image_size": 96, "cpu_image_size": 96})
    in_ram, _, _ = fit_on(base, x, y, x, y, p)
    on_disk, _, _ = fit_on(base, x, y, x, y, p, store_dir=tmp_path, spill=tmp_path)
    assert same_weights(in_ram, on_disk)


def test_an_interrupted_run_on_disk_resumes_to_the_in_memory_weights(base, tmp_path):  # noqa: F811
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    p = two_stages()
    reference, _, _ = fit_on(base, x, y, vx, vy, p)
    state = tmp_path / "state.pt"

    def stop(history):
        if len(history) == 3:  # mid unfrozen stage: the spilled cache of the resumed run starts empty
            raise Interrupt

    with pytest.raises(Interrupt):
        fit_on(base, x, y, vx, vy, p, store_dir=tmp_path / "a", spill=tmp_path, on_epoch=stop,
               saving=Saving(state, "f"))
    assert len(saved_state.load(state, "f").progress.history) == 3
    resumed, _, _ = fit_on(base, x, y, vx, vy, p, store_dir=tmp_path / "b", spill=tmp_path, saving=Saving(state, "f"))
    assert same_weights(reference, resumed)


def test_where_data_lives_is_not_part_of_the_resume_fingerprint(tmp_path):
    (tmp_path / "m.csv").write_text("x")
    (tmp_path / "w.pt").write_text("y")
    p = params(StageParams(name="s", epochs=1))

    def fp(**kw):
        return saved_state.fingerprint(tmp_path / "m.csv", tmp_path / "w.pt", p.model_copy(update=kw), 0, 1)

    assert fp() == fp(data_store="disk", feature_store="disk", memory_budget_mb=123, prefetch_batches=0) != fp(cache_features=False)


def test_the_budget_puts_images_then_features_on_disk(base, tmp_path):  # noqa: F811
    model = fresh(base)
    p = two_stages()
    roomy = plan(model, p.model_copy(update={"memory_budget_mb": 100_000}), 64, 2000, 200, tmp_path)
    assert (roomy.images, roomy.features) == ("ram", "ram")
    fixed = sum(v for k, v in roomy.need.items() if k not in ("images", "feature cache"))
    just_features = (fixed + roomy.need["feature cache"]) // (1 << 20) + 1
    tight = plan(model, p.model_copy(update={"memory_budget_mb": just_features}), 64, 2000, 200, tmp_path)
    assert (tight.images, tight.features) == ("disk", "ram")
    tighter = plan(model, p.model_copy(update={"memory_budget_mb": fixed // (1 << 20) + 1}), 64, 2000, 200, tmp_path)
    assert (tighter.images, tighter.features) == ("disk", "disk")
    forced = plan(model, p.model_copy(update={"data_store": "disk", "memory_budget_mb": 100_000}), 64, 20, 2, tmp_path)
    assert forced.images == "disk"
    with pytest.raises(TrainingError, match=r"memory budget \d+ MB is smaller than the estimate .*data_store"):
        plan(model, p.model_copy(update={"data_store": "ram", "memory_budget_mb": fixed // (1 << 20) + 1}), 64,
             2000, 200, tmp_path)


def test_an_impossible_budget_fails_before_training_naming_the_numbers(base, tmp_path):  # noqa: F811
    from tasks.train.stage import run

    images = make_dataset(tmp_path / "images", per_class=4, size=40)
    manifest_of(images).to_csv(tmp_path / "manifest.csv", index=False)
    model, meta = backbones.create("bundled", "efficientnet_lite0", "imagenet")
    (tmp_path / "base").mkdir()
    torch.save(model.state_dict(), tmp_path / "base" / "weights.pt")
    write_json(tmp_path / "base" / "meta.json", meta)
    p = params(StageParams(name="s", epochs=1), memory_budget_mb=1)
    t0 = time.perf_counter()
    with pytest.raises(TrainingError) as failure:
        run(tmp_path / "manifest.csv", images, tmp_path / "base", p, 0, tmp_path / "model.pt", tmp_path / "m.json",
            tmp_path / "h.csv", workers=1)
    message = str(failure.value)
    assert "memory budget 1 MB" in message and "process now" in message and "MB" in message.split("process now")[1]
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "h.csv").exists()
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_mid_epoch_on_disk_then_resume_gives_the_in_memory_weights(tmp_path):
    """Real processes: killed with SIGKILL right after the unfreeze (a spatial feature cache spilled to disk) and
    started again, a run from the store ends with the weights of an uninterrupted run in memory."""
    import signal
    import subprocess
    import sys

    from tasks.params import write_overrides
    from tests.conftest import REPO
    from tests.test_train_process import SETTINGS, env, finetune, finish

    make_dataset(tmp_path / "raw", per_class=20, size=64, mislabeled=2)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_overrides(tmp_path / "params.yaml", [*SETTINGS, "train.image_size=64", "train.cpu_image_size=64",
                                               "train.stages.0.epochs=1", "train.stages.1.epochs=2",
                                               "data.orientation_invariant=true"])  # dihedral: the cache is on
    finish(finetune("stage", "ingest", cwd=tmp_path))
    finish(finetune("stage", "fetch-model", cwd=tmp_path))
    for name, store in (("ram", "ram"), ("disk", "disk")):
        (tmp_path / f"{name}.yaml").write_text((tmp_path / "params.yaml").read_text())
        write_overrides(tmp_path / f"{name}.yaml", [f"train.data_store={store}", f"train.feature_store={store}"])

    def train(name: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tasks.train", "--params", f"{name}.yaml", "--manifest", "data/manifest.csv",
             "--checkpoint", f"out/{name}/model.pt", "--metrics", f"out/{name}/summary.json",
             "--history", f"out/{name}/history.csv", "--state", f"out/{name}/state.pt"],
            cwd=tmp_path, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    finish(train("ram"))
    killed = train("disk", FINETUNE_CRASH_AT="train:step:stage=1:epoch=0:batch=2")
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    output = finish(train("disk"))
    assert "resuming from" in output and "images: disk, feature cache: disk" in output, output
    summary = json.loads((tmp_path / "out" / "disk" / "summary.json").read_text())
    assert (summary["data_store"], summary["feature_store"]) == ("disk", "disk")
    ref, got = (torch.load(tmp_path / "out" / n / "model.pt", weights_only=True)["state_dict"] for n in ("ram", "disk"))
    assert ref.keys() == got.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert len(list((tmp_path / ".finetune" / "cache").glob("*/header.json"))) == 2  # train and val, built once


def test_a_build_killed_before_its_rename_leaves_no_store_and_the_next_one_sweeps_its_temp(tmp_path):
    import signal
    import subprocess
    import sys

    from tests.test_train_process import env

    images = make_dataset(tmp_path / "images", per_class=4, size=40)
    manifest_of(images).to_csv(tmp_path / "manifest.csv", index=False)
    code = ("import sys, pandas as pd; from pathlib import Path; from tasks.train.imagestore import split_store; "
            "print(split_store(pd.read_csv(sys.argv[1]), Path(sys.argv[2]), 'train', 32, root=Path(sys.argv[3])).folder)")
    args = [sys.executable, "-c", code, str(tmp_path / "manifest.csv"), str(images), str(tmp_path / "cache")]
    killed = subprocess.run(args, env=env(FINETUNE_CRASH_AT="imagestore:filled"), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list((tmp_path / "cache").glob("*/header.json")) and list((tmp_path / "cache").glob(".*.tmp"))
    built = subprocess.run(args, env=env(), capture_output=True, text=True, check=True)
    folder = Path(built.stdout.strip())
    assert (folder / "header.json").exists() and not list((tmp_path / "cache").glob(".*.tmp"))
    decoded, _ = split_arrays(manifest_of(images), images, "train", ["bright", "dark"], 32)
    assert torch.equal(ImageStore.open(folder)[torch.arange(len(decoded))], decoded)


def test_evaluation_decodes_the_test_split_batch_by_batch_with_the_same_logits(base, tmp_path):  # noqa: F811
    from tasks import evaluate
    from tasks.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from tasks.preprocess import Preprocessing
    from tasks.tensors import DecodedOnDemand, predict_logits

    images = make_dataset(tmp_path / "images", per_class=7, size=40)
    manifest = manifest_of(images, split_of=lambda i: "test" if i % 2 else "train")
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    save_checkpoint(tmp_path / "model.pt", fresh(base), Checkpoint(
        classes=["bright", "dark"], preprocessing=Preprocessing(size=64), base=base[1]))
    out = tmp_path / "eval"
    metrics = evaluate.run(tmp_path / "model.pt", tmp_path / "manifest.csv", images, out / "metrics.json",
                           out / "predictions.csv", out / "confusion.png", batch_size=3, workers=2)
    decoded, _ = split_arrays(manifest, images, "test", ["bright", "dark"], 64)
    model, _ = load_checkpoint(tmp_path / "model.pt")
    paths = [images / p for p in manifest.loc[manifest["split"] == "test", "path"]]
    on_demand = DecodedOnDemand(paths, 64, workers=2)
    cpu = torch.device("cpu")
    assert torch.equal(predict_logits(model, on_demand, MEAN, STD, cpu, 3), predict_logits(model, decoded, MEAN, STD,
                                                                                            cpu, 3))
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == len(decoded) == 7 and sum(metrics["confusion_matrix"][0]) + sum(
        metrics["confusion_matrix"][1]) == 7
