"""Staged training on tiny generated data: freezing, caching equivalence, NaN guard, a real fit.

Images are 64 px: at 32 px the pretrained Lite0 (BatchNorm in eval mode) outputs all-zero features.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from tasks import backbones as models
from tasks.params import DIHEDRAL_AUGMENT, StageParams, TrainParams
from tasks.tensors import apply_variant
from tasks.train import state as saved_state
from tasks.train.augment import (
    class_weights,
    epoch_order,
    prepare,
    variants_for,
)
from tasks.train.loop import Saving
from tasks.train.optim import lr_lambda, make_optimizer, param_groups
from tasks.train.runtime import TrainingError
from tasks.train.staging import StagedModel
from tests.conftest import REPO, fit

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def base():
    model, meta = models.create("bundled", "efficientnet_lite0", "imagenet")
    return model.state_dict(), meta


def fresh(base, n_classes=2):
    state, meta = base
    m = models.build(meta)
    m.load_state_dict(state)
    return models.with_new_head(m, n_classes, seed=0)


def toy(n=24, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand((n, 3, size, size), generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).clamp(0, 255)
    return x.to(torch.uint8), y


def params(*stages, **kw):
    return TrainParams(batch_size=8, image_size=64, cpu_image_size=64, stages=list(stages),
                       **{"augment": DIHEDRAL_AUGMENT, **kw})


def test_variants_cover_the_dihedral_group():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    outs = {tuple(apply_variant(x, v).flatten().tolist()) for v in variants_for(["hflip", "vflip", "rot90"])}
    assert len(outs) == 8
    assert variants_for([]) == [0]
    assert variants_for(["hflip"]) == [0, 4]


def test_class_weights_balance_the_loss():
    w = class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert w[0] < w[1] and w[2] == 0


def test_frozen_stage_changes_only_the_head_and_unfrozen_all(base):
    x, y = toy()
    m = fresh(base)
    before = copy.deepcopy(m.state_dict())
    p = params(StageParams(name="frozen", epochs=1, trainable="head", lr=1e-2))
    fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0)
    after = copy.deepcopy(m.state_dict())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}

    p = params(StageParams(name="all", epochs=1, trainable="all", lr=1e-3, bn="eval"))
    fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0)
    final = m.state_dict()
    assert not torch.equal(after["conv_stem.weight"], final["conv_stem.weight"])
    # bn=eval keeps running statistics frozen even while the weights train
    assert torch.equal(after["bn1.running_mean"], final["bn1.running_mean"])


@pytest.mark.parametrize("trainable", ["head", 2])
def test_feature_cache_gives_the_same_model(base, trainable):
    """Caching frozen-prefix outputs per augmentation variant is exact, not an approximation."""
    x, y = toy(n=16)
    stage = StageParams(name="s", epochs=3, trainable=trainable, lr=1e-2, bn="eval")
    results = []
    for cache in (True, False):
        m = fresh(base)
        fit(m, ["a", "b"], x, y, x, y, params(stage, cache_features=cache), MEAN, STD, 0)
        results.append(m.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-3, atol=2e-4, msg=k)


def test_last_n_blocks_trains_only_those_blocks(base):
    x, y = toy(n=16)
    m = fresh(base)
    before = copy.deepcopy(m.state_dict())
    fit(m, ["a", "b"], x, y, x, y, params(StageParams(name="s", epochs=1, trainable=1, lr=1e-2)),
              MEAN, STD, 0)
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
               for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert "blocks.6" in changed and "classifier" in changed
    assert not any(c in changed for c in ("conv_stem", "blocks.0", "blocks.5"))


def test_non_finite_loss_stops_with_a_clear_error(base):
    x, y = toy(n=16)
    m = fresh(base)
    p = params(StageParams(name="boom", epochs=2, trainable="head", lr=1e30))
    with pytest.raises(TrainingError, match=r"non-finite loss.*lower train.stages\[0\].lr"):
        fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0)


def test_same_seed_same_weights(base):
    x, y = toy(n=16)
    p = params(StageParams(name="s", epochs=1, trainable="all", lr=1e-3))
    states = []
    for _ in range(2):
        m = fresh(base)
        fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 7)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_learns_a_separable_problem(base):
    x, y = toy(n=32)
    vx, vy = toy(n=16, seed=1)
    m = fresh(base)
    p = params(StageParams(name="frozen", epochs=3, trainable="head", lr=3e-2))
    m, best, history = fit(m, ["a", "b"], x, y, vx, vy, p, MEAN, STD, 0)
    assert best["val"]["accuracy"] >= 0.9
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]


def test_progressive_resizing_selects_only_full_size_epochs(base):
    x, y = toy(n=16, size=96)
    m = fresh(base)
    p = TrainParams(batch_size=8, image_size=96, cpu_image_size=96, augment=DIHEDRAL_AUGMENT, stages=[
        StageParams(name="small", epochs=2, trainable="head", lr=3e-2, image_scale=0.67),
        StageParams(name="full", epochs=1, trainable="head", lr=1e-3),
    ])
    _, best, history = fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0)
    assert [h["image_size"] for h in history] == [64, 64, 96]
    assert best["stage"] == "full"


@pytest.mark.parametrize("metric", ["last", "loss"])
def test_the_kept_weights_are_the_last_epochs_or_the_best_by_the_metric(base, metric):
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    snapshots = []
    model = fresh(base)
    p = params(StageParams(name="frozen", epochs=2, trainable="head", lr=3e-2),
               StageParams(name="unfrozen", epochs=2, trainable=2, lr=1e-3, backbone_lr_mult=0.1), select_metric=metric)
    m, best, history = fit(model, ["a", "b"], x, y, vx, vy, p, MEAN, STD, 3,
                           on_epoch=lambda h: snapshots.append(copy.deepcopy(model.state_dict())))
    losses = [h["val_loss"] for h in history]
    expected = len(history) if metric == "last" else losses.index(min(losses)) + 1  # the first best, as logged
    assert best["global_epoch"] == expected and best["metric"] == metric
    kept = snapshots[expected - 1]
    assert all(torch.equal(v, kept[k]) for k, v in m.state_dict().items())
    if metric == "loss" and expected < len(history):  # a later epoch's weights differ: the best really was kept
        assert not all(torch.equal(v, snapshots[-1][k]) for k, v in m.state_dict().items())


# ---- stage boundaries, optimizers, schedules, BatchNorm policies, early stopping, sampling --------


class Interrupt(Exception):
    pass


def two_stages(**kw):
    return params(StageParams(name="frozen", epochs=2, trainable="head", lr=3e-2),
                  StageParams(name="unfrozen", epochs=2, trainable=2, lr=1e-3, backbone_lr_mult=0.1,
                              warmup_epochs=0.5), **kw)


def comparable(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s", "data_wait_s")} for h in history]


@pytest.fixture(scope="module")
def uninterrupted(base):
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    m, _, history = fit(fresh(base), ["a", "b"], x, y, vx, vy, two_stages(), MEAN, STD, 3)
    return m, history


@pytest.mark.parametrize("stop_after", [1, 2, 3])  # mid frozen stage, right after the unfreeze, mid unfrozen stage
def test_interrupted_run_resumes_to_the_same_weights(base, uninterrupted, tmp_path, stop_after):
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    p = two_stages()
    m_ref, h_ref = uninterrupted

    state = tmp_path / "state.pt"

    def stop(history):
        if len(history) == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(fresh(base), ["a", "b"], x, y, vx, vy, p, MEAN, STD, 3, on_epoch=stop,
            saving=Saving(state, "f"))
    saved = saved_state.load(state, "f")
    assert len(saved.progress.history) == stop_after
    m, _, h = fit(fresh(base), ["a", "b"], x, y, vx, vy, p, MEAN, STD, 3,
                        saving=Saving(state, "f"))
    assert comparable(h) == comparable(h_ref)  # same losses, metrics and learning rates epoch by epoch
    ref = m_ref.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


def test_a_state_from_another_run_is_not_resumed(base, tmp_path):
    x, y = toy(n=16)
    p = params(StageParams(name="s", epochs=2, trainable="head", lr=3e-2))
    state = tmp_path / "state.pt"

    def stop(history):
        raise Interrupt

    with pytest.raises(Interrupt):
        fit(fresh(base), ["a", "b"], x, y, x, y, p, MEAN, STD, 0, on_epoch=stop,
                  saving=Saving(state, "old"))
    _, _, history = fit(fresh(base), ["a", "b"], x, y, x, y, p, MEAN, STD, 0,
                              saving=Saving(state, "new"))
    assert len(history) == 2  # started over


def test_optimizer_state_carries_over_for_parameters_that_keep_training(base):
    m = fresh(base)
    first = StageParams(name="a", epochs=1, trainable="head", lr=1e-2)
    staged = StagedModel(m, "head", "eval")
    opt1 = make_optimizer(param_groups(m, first), first, None)
    m.get_classifier()(torch.randn(4, m.num_features)).sum().backward()
    opt1.step()
    second = StageParams(name="b", epochs=1, trainable=1, lr=1e-3, backbone_lr_mult=0.1)
    staged = StagedModel(m, 1, "eval")
    groups = param_groups(m, second)
    opt2 = make_optimizer(groups, second, opt1)
    head = m.get_classifier().weight
    assert opt2.state[head] is opt1.state[head] and int(opt2.state[head]["step"]) == 1
    assert {g["name"]: g["lr"] for g in opt2.param_groups} == {
        "backbone": 1e-4, "backbone/no_decay": 1e-4, "head": 1e-3, "head/no_decay": 1e-3}
    assert staged.n_frozen is not None
    sgd = StageParams(name="c", epochs=1, trainable=1, lr=1e-3, optimizer="sgd")
    opt3 = make_optimizer(param_groups(m, sgd), sgd, opt2)
    assert isinstance(opt3, torch.optim.SGD) and not opt3.state  # AdamW moments mean nothing to SGD


def test_schedules():
    cos = lr_lambda(100, 10, "cosine")
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(99) < 0.01
    one = lr_lambda(100, 0, "onecycle")
    assert one(0) == pytest.approx(1 / 25) and one(30) == pytest.approx(1.0)
    assert one(100) == pytest.approx(1e-4) and max(one(s) for s in range(100)) == pytest.approx(1.0)
    const = lr_lambda(100, 0, "constant")
    assert const(0) == const(99) == 1.0


def test_sgd_onecycle_stage_learns(base):
    x, y = toy(n=32)
    vx, vy = toy(n=16, seed=1)
    p = params(StageParams(name="s", epochs=3, trainable="head", lr=5e-2, optimizer="sgd", schedule="onecycle"))
    _, best, history = fit(fresh(base), ["a", "b"], x, y, vx, vy, p, MEAN, STD, 0)
    assert best["val"]["accuracy"] >= 0.9 and history[-1]["lr"] < 1e-4 * 5e-2 * 1.01


def test_bn_policies(base):
    x, y = toy(n=16)
    results = {}
    for policy in ("train", "eval", "frozen"):
        m = fresh(base)
        before = copy.deepcopy(m.state_dict())
        p = params(StageParams(name="s", epochs=1, trainable="all", lr=1e-3, bn=policy))
        fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0)
        after = m.state_dict()
        results[policy] = {
            "stats": not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"]),
            "affine": not torch.equal(before["bn1.weight"], after["bn1.weight"]),
            "conv": not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"]),
        }
    assert results["train"] == {"stats": True, "affine": True, "conv": True}
    assert results["eval"] == {"stats": False, "affine": True, "conv": True}
    assert results["frozen"] == {"stats": False, "affine": False, "conv": True}


def test_early_stopping_ends_a_stage_and_the_next_one_runs(base):
    x, y = toy(n=16)
    p = params(StageParams(name="stuck", epochs=6, trainable="head", lr=1e-12, schedule="constant"),
               StageParams(name="next", epochs=1, trainable="head", lr=1e-2), early_stopping_patience=2,
               select_metric="macro_f1")
    _, _, history = fit(fresh(base), ["a", "b"], x, y, x, y, p, MEAN, STD, 0)
    assert [h["stage"] for h in history] == ["stuck"] * 3 + ["next"]


def test_class_balanced_sampler_draws_the_minority_half_the_time():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = class_weights(labels, 2)[labels]
    order = epoch_order(len(labels), weights, torch.Generator().manual_seed(0))
    share = (labels[order] == 1).float().mean().item()
    assert 0.4 < share < 0.6
    assert sorted(epoch_order(5, None, torch.Generator().manual_seed(0)).tolist()) == [0, 1, 2, 3, 4]


def test_crop_and_jitter_are_seeded_and_turn_the_cache_off(base, caplog):
    x, y = toy(n=16)
    p = params(StageParams(name="s", epochs=1, trainable="head", lr=1e-2), augment=["hflip", "crop", "jitter"])
    with caplog.at_level("INFO", logger="tasks.train"):
        runs = [fit(fresh(base), ["a", "b"], x, y, x, y, p, MEAN, STD, 0)[2]
                for _ in range(2)]
    assert "cached prefix=False" in caplog.text
    assert comparable(runs[0]) == comparable(runs[1])
    g = torch.Generator().manual_seed(0)
    out = prepare(x[:4], 0, MEAN, STD, "cpu", {"crop", "jitter"}, 0.5, 0.2, g)
    assert out.shape == (4, 3, 64, 64) and torch.isfinite(out).all()
    plain = prepare(x[:4], 0, MEAN, STD, "cpu")
    assert not torch.allclose(out, plain)


class _Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("fingerprint", ["run", "another run"])
def test_a_planted_state_file_never_runs_code(tmp_path, fingerprint):
    """The header is checked before the payload is read, and the payload loads with weights_only=True."""
    import io
    import json
    import pickle

    marker, state = tmp_path / "pwned", tmp_path / "state.pt"
    payload = io.BytesIO()
    torch.save({"progress": _Planted(marker)}, payload, pickle_protocol=2)
    header = json.dumps({"version": saved_state.VERSION, "fingerprint": fingerprint}).encode() + b"\n"
    state.write_bytes(saved_state.MAGIC + header + payload.getvalue())
    assert saved_state.load(state, "run") is None
    with open(state.with_suffix(".pkl"), "wb") as f:  # the same object through plain pickle does run code
        pickle.dump(_Planted(marker), f)
    assert not marker.exists()
    pickle.loads(state.with_suffix(".pkl").read_bytes())
    assert marker.exists()


# ---- weight averaging (train.ema_decay) -------------------------------------------------------


def test_weight_average_follows_the_warmed_up_decay_and_restores_the_live_weights():
    from tasks.train.ema import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightAverage(model, decay=0.5)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    assert ema.shadow["weight"].item() == pytest.approx(expected)
    with ema.applied(model):
        assert model.weight.item() == pytest.approx(expected)
    assert model.weight.item() == 4.0


def test_ema_keeps_the_averaged_weights_it_validated(base):
    from tasks.train.staging import predict_logits

    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    plain, _, _ = fit(fresh(base), ["a", "b"], x, y, vx, vy, two_stages(), MEAN, STD, 3)
    m, best, history = fit(fresh(base), ["a", "b"], x, y, vx, vy, two_stages(ema_decay=0.9), MEAN, STD, 3)
    ref = plain.state_dict()
    assert not all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())  # averaging changed the weights
    logits = predict_logits(StagedModel(m, "head", "eval"), vx, MEAN, STD, torch.device("cpu"), 16)
    kept = history[best["global_epoch"] - 1]
    assert torch.nn.functional.cross_entropy(logits, vy).item() == pytest.approx(kept["val_loss"], abs=1e-5)


def test_an_interrupted_ema_run_resumes_to_the_same_weights(base, tmp_path):
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    p = two_stages(ema_decay=0.9)
    m_ref, _, h_ref = fit(fresh(base), ["a", "b"], x, y, vx, vy, p, MEAN, STD, 3)

    def stop(history):
        if len(history) == 3:
            raise Interrupt

    state = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        fit(fresh(base), ["a", "b"], x, y, vx, vy, p, MEAN, STD, 3, on_epoch=stop, saving=Saving(state, "f"))
    m, _, h = fit(fresh(base), ["a", "b"], x, y, vx, vy, p, MEAN, STD, 3, saving=Saving(state, "f"))
    assert comparable(h) == comparable(h_ref)
    ref = m_ref.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


# ---- soft targets (train.soft_targets) --------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_soft_targets_give_exactly_the_label_loss(smoothing):
    from tasks.train.loop import classification_loss

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(12, 2, generator=g), torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    w = class_weights(y, 2)
    one_hot = torch.nn.functional.one_hot(y, 2).float()
    for weight in (None, w):
        hard = classification_loss(logits, y, weight, smoothing)
        assert classification_loss(logits, one_hot, weight, smoothing).item() == pytest.approx(hard.item(), abs=1e-6)


def test_soft_targets_come_from_the_defect_probability_and_change_training(base):
    import pandas as pd

    from tasks.tensors import split_soft_targets
    from tests.conftest import fit as fit_

    manifest = pd.DataFrame({"split": ["train", "train", "val", "train"], "probability": [0.0, 2 / 3, 1.0, 1 / 3]})
    soft = split_soft_targets(manifest, "train", ["defective", "functional"], "defective")
    assert torch.allclose(soft, torch.tensor([[0.0, 1.0], [2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    with pytest.raises(ValueError, match="probability"):
        split_soft_targets(manifest.drop(columns="probability"), "train", ["defective", "functional"], "defective")

    from tasks.train.loop import Data, Split
    from tasks.train.loop import fit as loop_fit

    x, y = toy(n=16)
    p = params(StageParams(name="frozen", epochs=1, trainable="head", lr=3e-2))
    hard_model, _, _ = fit_(fresh(base), ["a", "b"], x, y, x, y, p, MEAN, STD, 0)
    hedged = torch.nn.functional.one_hot(y, 2).float() * 0.6 + 0.2  # every target 0.8 / 0.2
    data = Data(["a", "b"], Split(x, y, hedged), Split(x, y))
    soft_model, _, _ = loop_fit(fresh(base), data, p, MEAN, STD, 0, torch.device("cpu"))
    one_hot = Data(["a", "b"], Split(x, y, torch.nn.functional.one_hot(y, 2).float()), Split(x, y))
    same_model, _, _ = loop_fit(fresh(base), one_hot, p, MEAN, STD, 0, torch.device("cpu"))
    hard, soft, same = hard_model.state_dict(), soft_model.state_dict(), same_model.state_dict()
    assert not torch.allclose(soft["classifier.weight"], hard["classifier.weight"])
    assert all(torch.allclose(same[k], v, atol=1e-6) for k, v in hard.items())


@pytest.mark.parametrize("compiled", [False, True])
def test_deterministic_mode_is_on_and_inductor_is_imported_only_when_compiling(compiled):
    """The train stage's CPU determinism: the flag eager code reads is on, warn-only, either way; inductor's config (1.3 s
    of a stage process's start) is imported only by a run that compiles, whose flag it also sets."""
    code = ("import sys, torch; from tasks.train.stage import deterministic; "
            f"deterministic(compiled={compiled}); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "'torch._inductor.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["True", "True", str(compiled)], out.stdout + out.stderr
