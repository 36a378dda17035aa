"""Staged training on tiny generated data: freezing, caching equivalence, NaN guard, a real fit.

Images are 64 px: at 32 px the pretrained Lite0 (BatchNorm in eval mode) outputs all-zero features.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tasks import models, train
from tasks.data import apply_variant, class_weights, variants_for
from tasks.params import StageParams, TrainParams

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
    return TrainParams(batch_size=8, image_size=64, cpu_image_size=64, stages=list(stages), **kw)


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
    train.fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0, torch.device("cpu"))
    after = copy.deepcopy(m.state_dict())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}

    p = params(StageParams(name="all", epochs=1, trainable="all", lr=1e-3, bn="eval"))
    train.fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0, torch.device("cpu"))
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
        train.fit(m, ["a", "b"], x, y, x, y, params(stage, cache_features=cache), MEAN, STD, 0, torch.device("cpu"))
        results.append(m.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-3, atol=2e-4, msg=k)


def test_last_n_blocks_trains_only_those_blocks(base):
    x, y = toy(n=16)
    m = fresh(base)
    before = copy.deepcopy(m.state_dict())
    train.fit(m, ["a", "b"], x, y, x, y, params(StageParams(name="s", epochs=1, trainable=1, lr=1e-2)),
              MEAN, STD, 0, torch.device("cpu"))
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
               for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert "blocks.6" in changed and "classifier" in changed
    assert not any(c in changed for c in ("conv_stem", "blocks.0", "blocks.5"))


def test_non_finite_loss_stops_with_a_clear_error(base):
    x, y = toy(n=16)
    m = fresh(base)
    p = params(StageParams(name="boom", epochs=2, trainable="head", lr=1e30))
    with pytest.raises(train.TrainingError, match=r"non-finite loss.*lower train.stages\[0\].lr"):
        train.fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0, torch.device("cpu"))


def test_same_seed_same_weights(base):
    x, y = toy(n=16)
    p = params(StageParams(name="s", epochs=1, trainable="all", lr=1e-3))
    states = []
    for _ in range(2):
        m = fresh(base)
        train.fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 7, torch.device("cpu"))
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_learns_a_separable_problem(base):
    x, y = toy(n=32)
    vx, vy = toy(n=16, seed=1)
    m = fresh(base)
    p = params(StageParams(name="frozen", epochs=3, trainable="head", lr=3e-2))
    m, best, history = train.fit(m, ["a", "b"], x, y, vx, vy, p, MEAN, STD, 0, torch.device("cpu"))
    assert best["val"]["accuracy"] >= 0.9
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]


def test_progressive_resizing_selects_only_full_size_epochs(base):
    x, y = toy(n=16, size=96)
    m = fresh(base)
    p = TrainParams(batch_size=8, image_size=96, cpu_image_size=96, stages=[
        StageParams(name="small", epochs=2, trainable="head", lr=3e-2, image_scale=0.67),
        StageParams(name="full", epochs=1, trainable="head", lr=1e-3),
    ])
    _, best, history = train.fit(m, ["a", "b"], x, y, x, y, p, MEAN, STD, 0, torch.device("cpu"))
    assert [h["image_size"] for h in history] == [64, 64, 96]
    assert best["stage"] == "full"
