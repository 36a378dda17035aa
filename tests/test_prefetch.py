"""Batches read ahead on a background thread: same order, errors where they belong, and the same weights."""

from __future__ import annotations

import threading

import pytest
import torch

from tasks.params import StageParams
from tasks.train.prefetch import Batch, DeviceCopy, Prefetcher
from tests.test_imagestore import fit_on, same_weights
from tests.test_train import base, comparable, params, toy, two_stages  # noqa: F401


def test_items_come_in_order_from_another_thread_and_ahead_of_the_consumer():
    main, callers = threading.get_ident(), []
    second_fetched = threading.Event()

    def fetch(i):
        callers.append(threading.get_ident())
        if i == 1:
            second_fetched.set()
        return i * i

    with Prefetcher(fetch, range(10), depth=2) as ahead:
        it = iter(ahead)
        assert next(it) == 0
        # item 1 is fetched without the consumer asking for it
        assert second_fetched.wait(timeout=30)
        assert list(it) == [i * i for i in range(1, 10)]
    assert len(callers) == 10 and main not in callers
    assert ahead.wait_s >= 0


def test_depth_zero_fetches_inline_and_measures_the_wait():
    callers = []
    ahead = Prefetcher(lambda i: callers.append(threading.get_ident()) or i, range(3), depth=0)
    assert list(ahead) == [0, 1, 2] and set(callers) == {threading.get_ident()} and ahead.wait_s > 0


def test_a_failed_read_surfaces_at_its_item_and_nothing_is_read_past_the_depth():
    started = []

    def fetch(i):
        started.append(i)
        if i == 3:
            raise OSError("store unreadable")
        return i

    got = []
    with pytest.raises(OSError, match="store unreadable"):
        with Prefetcher(fetch, range(100), depth=2) as ahead:
            for item in ahead:
                got.append(item)
    assert got == [0, 1, 2]
    assert max(started) <= 3 + 2  # at most `depth` reads beyond the failed one were ever submitted


def test_leaving_early_cancels_the_reads_not_started():
    started = []
    gate = threading.Event()

    def fetch(i):
        started.append(i)
        if i == 1:
            gate.wait(timeout=30)
        return i

    with Prefetcher(fetch, range(100), depth=3) as ahead:
        for item in ahead:
            assert item == 0
            gate.set()
            break
    assert max(started) <= 3  # item 0 plus at most `depth` submitted; the 96 others never started


def test_on_the_cpu_the_batch_stays_where_it_is():
    batch = Batch([(0, torch.zeros(2, 3))], torch.tensor([0, 1]))
    copy = DeviceCopy(torch.device("cpu"))
    assert copy.arrived(copy(batch)) is batch


@pytest.mark.parametrize("case", ["feature-cache", "augmented-images", "disk-store-and-spilled-cache"])
def test_prefetching_trains_the_same_weights_as_reading_inline(base, tmp_path, case):  # noqa: F811
    x, y = toy(n=24)
    vx, vy = toy(n=8, seed=1)
    if case == "augmented-images":  # random crops and jitter: the draws must come in the same order
        p = params(StageParams(name="all", epochs=2, trainable=2, lr=1e-3), augment=["hflip", "crop", "jitter"])
    else:
        p = two_stages()
    disk = {"store_dir": tmp_path, "spill": tmp_path} if case.startswith("disk") else {}
    inline, best, history = fit_on(base, x, y, vx, vy, p.model_copy(update={"prefetch_batches": 0}), **disk)
    ahead, best_a, history_a = fit_on(base, x, y, vx, vy, p.model_copy(update={"prefetch_batches": 3}),
                                      **({"store_dir": tmp_path / "b", "spill": tmp_path} if disk else {}))
    assert same_weights(inline, ahead)
    assert comparable(history) == comparable(history_a) and best == best_a
    assert all(h["data_wait_s"] >= 0 for h in history + history_a)
