"""Training batches fetched ahead of the step on a background thread (`train.prefetch_batches`).

The thread only reads: a batch's rows of the images (in memory or in the disk store) or of the feature cache,
and its targets. On CUDA it also copies them into page-locked memory and on to the GPU on a side stream, so the
copy overlaps the step instead of stalling it. Everything random (augmentation) and every computation stays on
the training thread, in the same order, so prefetching changes when a batch arrives, never what arrives: the
weights are the same bit for bit (tests/test_prefetch.py). The time the step waited for its batch is measured
either way and recorded per epoch (`data_wait_s` in the history): near zero means the data keeps up with the
model; a large share of the epoch means the run is input-bound.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_END = object()


class Prefetcher(Generic[T, R]):
    """`fetch(item)` for each item, in order, up to `depth` items ahead of the consumer, on one background thread
    (one thread keeps the order of its reads; `depth` 0 fetches inline). Iterating yields the results; `wait_s`
    is the time the consumer spent waiting for them. Use it as a context manager: leaving it (an exception in
    the step included) cancels what has not started and waits for the fetch in progress."""

    def __init__(self, fetch: Callable[[T], R], items: Iterable[T], depth: int):
        self.fetch, self.items, self.depth = fetch, iter(items), depth
        self.wait_s = 0.0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if depth > 0 else None
        self.pending: deque[Future] = deque()

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()

    def _submit_next(self) -> None:
        for item in self.items:
            self.pending.append(self.pool.submit(self.fetch, item))
            return

    def __iter__(self) -> Iterator[R]:
        results = (self.fetch(item) for item in self.items) if self.pool is None else self._ahead()
        while True:
            t0 = time.perf_counter()
            out = next(results, _END)
            self.wait_s += time.perf_counter() - t0
            if out is _END:
                return
            yield out

    def _ahead(self) -> Iterator[R]:
        for _ in range(self.depth):
            self._submit_next()
        while self.pending:
            head = self.pending.popleft()
            self._submit_next()  # keep `depth` batches in flight while this one is consumed
            yield head.result()  # re-raises the fetch's exception here, on the training thread


@dataclass
class Batch:
    """A training batch as fetched: rows per augmentation variant (uint8 images or cached features), targets."""

    groups: list[tuple[int, torch.Tensor]]
    targets: torch.Tensor
    ready: torch.cuda.Event | None = None  # CUDA: recorded on the copy stream once the rows are on the GPU


class DeviceCopy:
    """Moves a fetched batch to the training device from the prefetch thread: on CUDA through page-locked memory
    on a side stream (`arrived` makes the training stream wait for that copy); elsewhere nothing to do (the step
    reads host memory)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: Batch) -> Batch:
        if self.stream is None:
            return batch
        with torch.cuda.stream(self.stream):  # also makes the stream's device current on this thread
            groups = [(v, rows.pin_memory().to(self.device, non_blocking=True)) for v, rows in batch.groups]
            targets = batch.targets.pin_memory().to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return Batch(groups, targets, ready)

    def arrived(self, batch: Batch) -> Batch:
        """On the training thread: order the step after the copy; tell the allocator the tensors are used there."""
        if batch.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.ready)
            for _, rows in batch.groups:
                rows.record_stream(current)
            batch.targets.record_stream(current)
        return batch
