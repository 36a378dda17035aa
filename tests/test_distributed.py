"""DDP on CPU (gloo, 2 processes): replicas stay identical across the unfreeze and the result
matches one process training on the same global batches."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from tasks import backbones as models
from tasks.params import DIHEDRAL_AUGMENT, StageParams, TrainParams
from tasks.train.runtime import Dist
from tests.conftest import fit

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PARAMS = TrainParams(batch_size=8, image_size=64, cpu_image_size=64, imbalance="none", augment=DIHEDRAL_AUGMENT, stages=[
    StageParams(name="frozen", epochs=2, trainable="head", lr=3e-2),
    StageParams(name="unfrozen", epochs=2, trainable=2, lr=1e-3, backbone_lr_mult=0.1, bn="eval"),
])


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    x = (torch.rand((16, 3, 64, 64), generator=g) * 80 + 40 + 120 * y.view(-1, 1, 1, 1)).clamp(0, 255)
    return x.to(torch.uint8), y


def model():
    m, _ = models.create("bundled", "efficientnet_lite0", "imagenet")
    m = models.with_new_head(m, 2, seed=0)
    m.drop_rate = 0.0  # dropout masks differ with the batch split; everything else must match
    return m


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = data()
        m, _, history = fit(model(), ["a", "b"], x, y, x, y, PARAMS, MEAN, STD, 0,
                            dist=Dist(rank=rank, world=world, local_rank=rank))
        torch.save({"state": m.state_dict(), "history": history}, f"{out}/rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_two_process_ddp_matches_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # replicas identical at the end and after every epoch, the unfreeze included
    assert all(torch.equal(v, r1["state"][k]) for k, v in r0["state"].items())
    assert [h["stage"] for h in r0["history"]] == ["frozen", "frozen", "unfrozen", "unfrozen"]
    assert all(h["replica_max_diff"] == 0.0 for h in r0["history"])

    torch.set_num_threads(1)
    x, y = data()
    single, _, history = fit(model(), ["a", "b"], x, y, x, y, PARAMS, MEAN, STD, 0)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(r0["history"], history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
