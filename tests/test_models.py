"""Model registry: the bundled Lite0 weights are really loaded; bad weights are refused."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tasks import models
from tasks.images import resize_square
from tasks.data import normalise


@pytest.fixture(scope="module")
def lite0():
    model, meta = models.create("bundled", "efficientnet_lite0", "imagenet")
    return model.eval(), meta


@pytest.mark.parametrize(
    "photo, expected",
    [("chelsea", {"Egyptian cat", "tabby, tabby cat", "tiger cat"}), ("coffee", {"espresso", "cup"})],
)
def test_bundled_imagenet_head_classifies_real_photos(lite0, photo, expected):
    """A wrong key mapping gives the same junk class for everything; the right one sees a cat."""
    import skimage.data
    from PIL import Image
    from timm.data import ImageNetInfo

    model, meta = lite0
    img = Image.fromarray(getattr(skimage.data, photo)())
    x = normalise(torch.from_numpy(resize_square(img, 224))[None], meta["mean"], meta["std"])
    with torch.no_grad():
        top = model(x).softmax(-1)[0].argmax().item()
    assert ImageNetInfo().index_to_description(top) in expected


def test_bundled_metadata(lite0):
    _, meta = lite0
    assert meta["sha256"] == models.BUNDLED_SHA256["efficientnet_lite0"]
    assert 4_600_000 < meta["num_params"] < 4_700_000  # the 4.7M-parameter Lite0
    assert meta["num_classes"] == 1000


def test_new_head_and_backbone_groups(lite0):
    model, meta = lite0
    m = models.build(meta)
    m.load_state_dict(model.state_dict())
    models.with_new_head(m, 3, seed=0)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    groups = models.backbone_blocks(m)
    head = {id(p) for p in m.get_classifier().parameters()}
    names = dict(m.named_parameters())
    flat = [n for g in groups for n in g]
    assert groups[0][0].startswith("conv_stem") and len(groups) >= 7
    assert not any(id(names[n]) in head for n in flat)
    assert len(flat) + len(head) == len(names)  # every parameter is backbone or head


def _state(tmp_path, obj, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_checkpoint_source_requires_matching_sha256(tmp_path):
    import timm

    state = timm.create_model("efficientnet_lite0").state_dict()
    path = _state(tmp_path, state)
    from tasks.io import sha256_file

    good = sha256_file(path)
    model, meta = models.create("checkpoint", "efficientnet_lite0", str(path), good)
    assert meta["sha256"] == good
    with pytest.raises(models.WeightsError, match="sha256 mismatch"):
        models.create("checkpoint", "efficientnet_lite0", str(path), "0" * 64)
    with pytest.raises(models.WeightsError, match="sha256 is required"):
        models.create("checkpoint", "efficientnet_lite0", str(path), None)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    from tasks.io import sha256_file

    with pytest.raises(models.WeightsError, match="weights_only"):
        models.create("checkpoint", "efficientnet_lite0", str(path), sha256_file(path))


def test_missing_weights_file_says_how_to_provide_it(tmp_path):
    with pytest.raises(models.WeightsError, match="not found.*model.weights"):
        models.create("checkpoint", "efficientnet_lite0", str(tmp_path / "absent.pth"), "ab" * 32)
