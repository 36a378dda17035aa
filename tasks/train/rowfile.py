"""Fixed-shape rows of one dtype in a raw file: the on-disk form of decoded images and spilled features.

The file is a plain C-order array, so `np.memmap(path, dtype, "r", shape=(n, *row))` opens it. Training
reads and writes it with `pread`/`pwrite` into its own small buffers instead of through a mapping:
pages of a mapped file that a process has touched count towards its resident memory (RSS) until the
kernel drops them, so random batches over a mapping would grow a run's RSS to the file's size over an
epoch. Read into a buffer, the data passes through the page cache, which the kernel shrinks under
pressure, and the process keeps only one batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tasks.files import new_temp


class RowFile:
    """`n` rows of shape `row` and dtype `dtype` in the file `path` (created when `create`)."""

    def __init__(self, path: str | Path, n: int, row: tuple[int, ...], dtype: str | np.dtype,
                 create: bool = False, writable: bool = False):
        self.path, self.n, self.row, self.dtype = Path(path), int(n), tuple(int(s) for s in row), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row, dtype=np.int64)) * self.dtype.itemsize
        flags = os.O_RDWR | os.O_CREAT if create else (os.O_RDWR if writable else os.O_RDONLY)
        self.fd = os.open(self.path, flags, 0o666)
        if create:
            os.ftruncate(self.fd, self.n * self.row_bytes)
        elif os.fstat(self.fd).st_size != self.n * self.row_bytes:
            size = os.fstat(self.fd).st_size
            os.close(self.fd)
            raise ValueError(f"{path}: {size} bytes, expected {self.n} rows of {self.row_bytes} bytes")

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.n * self.row_bytes

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()

    def read(self, idx) -> np.ndarray:
        """Rows `idx` (any order, repeats allowed) as a new array (len(idx), *row); neighbours are read together."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.path}: row index out of range 0..{self.n - 1}")
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        buf = np.empty((len(idx), *self.row), dtype=self.dtype)
        for a, b in _runs(rows):
            _read_exact(self.fd, memoryview(buf[a:b]).cast("B"), int(rows[a]) * self.row_bytes)
        out = np.empty_like(buf)
        out[order] = buf
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.read(np.arange(start, min(stop, self.n)))

    def write(self, idx, values: np.ndarray) -> None:
        """Write `values[i]` to row `idx[i]` (indices unique)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(values, dtype=self.dtype).reshape(len(idx), *self.row)
        order = np.argsort(idx, kind="stable")
        rows, values = idx[order], values[order]
        for a, b in _runs(rows):
            _write_all(self.fd, memoryview(values[a:b]).cast("B"), int(rows[a]) * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self.fd)


def _runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) spans of `sorted_rows` that are consecutive row numbers (one read or write each)."""
    if not len(sorted_rows):
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(sorted_rows)]
    return list(zip(edges[:-1], edges[1:]))


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError(f"short read at byte {offset}")
        view, offset = view[got:], offset + got


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def scratch_rows(near: str | Path, name: str, n: int, row: tuple[int, ...], dtype: str | np.dtype) -> RowFile:
    """A nameless RowFile for scratch data (spilled features, resized images): created in the scratch folder of
    `near` and unlinked at once, so its disk space returns when it is closed or the process dies, even by SIGKILL."""
    path = new_temp(Path(near) / name)
    rows = RowFile(path, n, row, dtype, create=True)
    path.unlink()
    return rows
