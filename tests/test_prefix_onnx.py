"""The frozen layers in ONNX Runtime (`train.prefix_runtime`): the features PyTorch computes, to float rounding; the
same training; bit-identical weights after an interruption (the resumed run's cache is refilled by a new session)."""

from __future__ import annotations

import logging

import pytest
import torch

from tasks.device import Precision
from tasks.train import state as saved_state
from tasks.train.loop import Saving
from tasks.train.prefix_onnx import MIN_BATCHES, onnx_prefix, wants_onnx_prefix
from tasks.train.staging import StagedModel
from tests.test_imagestore import fit_on, same_weights
from tests.test_train import Interrupt, base, comparable, fresh, toy, two_stages  # noqa: F401

CPU = torch.device("cpu")


@pytest.mark.parametrize("trainable", ["head", 2])
def test_the_onnx_prefix_computes_what_pytorch_computes_and_the_same_bits_every_call(base, trainable):  # noqa: F811
    staged = StagedModel(fresh(base).eval(), trainable, "eval")
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    run = onnx_prefix(staged, 64, 8, torch.get_num_threads())
    assert run is not None
    with torch.no_grad():
        expected = staged.prefix(x)
    got = run(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(run(x.clone()), got)  # deterministic: a refilled cache holds the same values
    with pytest.raises(ValueError, match="prefix graph takes"):
        run(x[:4])  # one batch size only: the cache pads its chunks to it


def test_training_with_the_onnx_prefix_matches_pytorch_and_says_so(base, caplog):  # noqa: F811
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        onnx, best_o, history_o = fit_on(base, x, y, vx, vy, two_stages(prefix_runtime="onnxruntime"))
    assert caplog.text.count("frozen layers run in ONNX Runtime") == 2  # one graph per stage
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        torch_, best_t, history_t = fit_on(base, x, y, vx, vy, two_stages(prefix_runtime="torch"))
    assert "ONNX Runtime" not in caplog.text
    for (name, a), b in zip(onnx.state_dict().items(), torch_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4, msg=name)
    assert [h["val_accuracy"] for h in history_o] == [h["val_accuracy"] for h in history_t]


def test_an_interrupted_run_with_the_onnx_prefix_resumes_bit_for_bit(base, tmp_path):  # noqa: F811
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    p = two_stages(prefix_runtime="onnxruntime")
    reference, _, history = fit_on(base, x, y, vx, vy, p)
    state = tmp_path / "state.pt"

    def stop(h):
        if len(h) == 3:  # mid unfrozen stage: the resumed run exports a new graph and refills its cache
            raise Interrupt

    with pytest.raises(Interrupt):
        fit_on(base, x, y, vx, vy, p, on_epoch=stop, saving=Saving(state, "f"))
    assert len(saved_state.load(state, "f").progress.history) == 3
    resumed, _, resumed_history = fit_on(base, x, y, vx, vy, p, saving=Saving(state, "f"))
    assert same_weights(reference, resumed)
    assert comparable(resumed_history) == comparable(history)


def test_auto_uses_onnx_runtime_only_on_cpu_in_fp32_and_when_the_export_pays_off():
    enough = MIN_BATCHES * 16  # images that make MIN_BATCHES batches of 16 in one epoch

    def wants(runtime="auto", device=CPU, precision=Precision(), n_train=enough, epochs=1):
        return wants_onnx_prefix(runtime, device, precision, n_train, 0, epochs, 8, 16)

    assert wants() and wants("onnxruntime")
    assert not wants(n_train=enough - 16) and wants("onnxruntime", n_train=16)  # the tiny case: not worth 5 s
    assert wants(n_train=enough // 4, epochs=4)  # each epoch computes a new variant of every image
    assert wants(n_train=enough // 8, epochs=8)
    assert not wants(n_train=enough // 16, epochs=40)  # 8 variants at most: later epochs read the cache
    assert not wants("torch")
    assert not wants(device=torch.device("cuda")) and not wants("onnxruntime", device=torch.device("cuda"))
    assert not wants("onnxruntime", precision=Precision(torch.bfloat16))
