"""Test-time augmentation (`export.tta`): the averaged model is the mean of the variants' probabilities, the
exported graph carries it (and is then exactly invariant to the averaged transformations), evaluation scores
the same model as the export, and dihedral TTA is refused for data with an up and a left."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tasks import evaluate
from tasks.inference import OnnxClassifier, read_metadata
from tasks.manifest import read_manifest
from tasks.params import Params
from tasks.tensors import apply_variant, split_arrays
from tasks.tta import VARIANTS, Averaged, with_tta
from tests.test_export import do_export, setup  # noqa: F401  (the module-scoped checkpoint + data fixture)


def orientation_sensitive_model(scale: float = 1.0) -> nn.Module:
    """A conv net whose classifier sees every spatial position, so rotating the input changes its output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 3),
                         _Scale(scale)).eval()


class _Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


@pytest.mark.parametrize("mode", ["hflip", "dihedral"])
def test_averaged_softmax_is_the_mean_of_the_variants_probabilities(mode):
    model = orientation_sensitive_model()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = torch.stack([model(apply_variant(x, v)).softmax(-1) for v in VARIANTS[mode]]).mean(0)
        got = with_tta(model, mode)(x).softmax(-1)
        single = model(x).softmax(-1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, single, atol=1e-3)  # the variants do change this model's answer


def test_averaged_logits_stay_finite_when_the_model_is_certain():
    model = orientation_sensitive_model(scale=1e4)  # softmax saturates: some probabilities are exactly 0
    with torch.no_grad():
        out = Averaged(model, VARIANTS["dihedral"])(torch.randn(4, 3, 8, 8))
    assert torch.isfinite(out).all()
    assert torch.allclose(out.exp().sum(-1), torch.ones(4), atol=1e-5)


def test_none_returns_the_model_itself_and_unknown_modes_are_refused():
    model = orientation_sensitive_model()
    assert with_tta(model, "none") is model
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rot45'"):
        with_tta(model, "rot45")


def test_dihedral_tta_is_refused_for_natural_images():
    with pytest.raises(ValidationError, match="export.tta: dihedral .* data.orientation_invariant"):
        Params.model_validate({"data": {"source": "folder", "path": "raw"}, "export": {"tta": "dihedral"}})
    ok = Params.model_validate({"data": {"source": "folder", "path": "raw", "orientation_invariant": True},
                                "export": {"tta": "dihedral"}})
    assert ok.export.tta == "dihedral"
    assert Params.model_validate({"data": {"source": "folder", "path": "raw"}, "export": {"tta": "hflip"}})


@pytest.fixture(scope="module")
def exported_tta(setup):  # noqa: F811
    root, data, ckpt = setup
    report = do_export(root, data, ckpt, out_name="model.tta.onnx", int8=False, tta="dihedral")
    return root / "model.tta.onnx", report


def test_exported_graph_carries_dihedral_tta_and_is_invariant(setup, exported_tta):  # noqa: F811
    path, report = exported_tta
    assert report["passed"] and report["max_abs_logit_diff"] < 1e-3 and report["top1_agreement"] == 1.0
    assert read_metadata(path)["tta"] == "dihedral"
    root, data, _ = setup
    manifest = read_manifest(data / "manifest.csv")
    images, _ = split_arrays(manifest, data / "images", "test", ["bright", "dark"], 64, 2)
    clf = OnnxClassifier(path)
    _, probs = clf.run(images.numpy())
    for v in (1, 4, 7):  # any rotation/mirror of the input: the same averaged answer
        _, turned = clf.run(apply_variant(images, v).contiguous().numpy())
        np.testing.assert_allclose(turned, probs, atol=1e-5)


def test_evaluation_scores_the_model_as_exported(setup, exported_tta, tmp_path):  # noqa: F811
    root, data, ckpt = setup
    out = tmp_path / "eval"
    metrics = evaluate.run(ckpt, data / "manifest.csv", data / "images", out / "metrics.json",
                           out / "predictions.csv", out / "confusion.png", batch_size=4, workers=2, tta="dihedral")
    assert metrics["tta"] == "dihedral"
    preds = pd.read_csv(out / "predictions.csv")
    images, _ = split_arrays(read_manifest(data / "manifest.csv"), data / "images", "test", ["bright", "dark"], 64, 2)
    _, onnx_probs = OnnxClassifier(exported_tta[0]).run(images.numpy())
    np.testing.assert_allclose(preds[["p_bright", "p_dark"]].to_numpy(), onnx_probs, atol=1e-4)
    plain = json.loads((out / "metrics.json").read_text())
    assert plain["n"] == len(preds)
