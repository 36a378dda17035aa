"""Running the model for concurrent requests: one call per request, or concurrent requests merged into
one batch (micro-batching).

Both run ONNX Runtime in a small thread pool of `concurrency` threads, so at most that many model
calls run at once whatever the number of clients (more would only fight over the cores). With
batching on, requests that arrive while the model is busy wait in a queue, and the next free thread
takes all of them at once, up to `max_batch` images (after waiting up to `max_delay_s` for more, when
that is above zero). A batch only ever holds requests for one model object: during a hot swap the
requests that captured the old model finish on it.

Whether batching pays depends on the model and the CPU (bench/bench_serving.py measures both; the
default the server ships is what won there, see docs/serving.md).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np


class Model(Protocol):
    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]: ...  # (logits, probabilities[, embedding])


@dataclass
class _Item:
    model: Model
    images: np.ndarray
    future: asyncio.Future = field(repr=False)


class Runner:
    """`await runner.run(model, images)` -> the model's outputs for the images ((logits, probabilities), or with
    the embedding when the drift monitor asks for it), on the runner's threads."""

    def __init__(self, concurrency: int = 1, batching: bool = False, max_batch: int = 32, max_delay_s: float = 0.0,
                 on_batch: Callable[[int], None] | None = None):
        if concurrency < 1 or max_batch < 1 or max_delay_s < 0:
            raise ValueError(f"concurrency {concurrency} and max_batch {max_batch} must be >= 1, "
                             f"max_delay_s {max_delay_s} >= 0")
        self.concurrency, self.batching = concurrency, batching
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self.on_batch = on_batch or (lambda n: None)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model")
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []

    def describe(self) -> dict:
        return {"concurrency": self.concurrency, "batching": self.batching, "max_batch": self.max_batch,
                "max_delay_ms": self.max_delay_s * 1000}

    async def start(self) -> None:
        if self.batching and not self._workers:
            self._wakeup = asyncio.Event()
            self._workers = [asyncio.create_task(self._worker(), name=f"batcher-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._workers = []
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def run(self, model: Model, images: np.ndarray) -> tuple[np.ndarray, ...]:
        loop = asyncio.get_running_loop()
        if not self._workers:  # batching off (or not started): one model call for this request
            self.on_batch(len(images))
            return await loop.run_in_executor(self.executor, model.run, images)
        item = _Item(model, images, loop.create_future())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    def _take(self) -> list[_Item]:
        """The oldest waiting request, and those after it for the same model while the batch has room."""
        batch: list[_Item] = []
        n = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # its client went away
                self._pending.popleft()
                continue
            if batch and (item.model is not batch[0].model or n + len(item.images) > self.max_batch):
                break
            batch.append(self._pending.popleft())
            n += len(item.images)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_delay_s > 0 and sum(len(i.images) for i in self._pending) < self.max_batch:
                await asyncio.sleep(self.max_delay_s)  # the batching window: let more requests join
            batch = self._take()
            if not batch:
                continue
            self.on_batch(sum(len(i.images) for i in batch))
            try:
                images = batch[0].images if len(batch) == 1 else np.concatenate([i.images for i in batch])
                outputs = await loop.run_in_executor(self.executor, batch[0].model.run, images)
            except Exception as exc:  # a failure belongs to every request of the batch
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in batch:
                end = start + len(item.images)
                if not item.future.done():
                    item.future.set_result(tuple(out[start:end] for out in outputs))
                start = end
