"""The interpreter's own threads: kernels split their work into independent tasks.

NumPy releases the GIL inside its copies, ufunc loops and BLAS calls, so plain Python
threads run the pieces of a kernel in parallel. Each task does all the work on its
piece (an im2col block is copied and multiplied by the same thread, while it is in
that core's cache), and BLAS runs single-threaded inside it. Measured on the 2-core
machine, letting OpenBLAS split each product instead is slower: its idle threads
spin between calls and slow the single-threaded copies in between (VGG-16's conv1_2:
2-thread OpenBLAS with copies in between 34-50 ms, two tasks each copying and
multiplying 22 ms).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

# Below this much work per thread a piece is not worth a thread hand-off (about 50 µs):
# elements that a pass over memory reads or writes, or multiply-adds of a matrix product.
MIN_PARALLEL_ELEMENTS = 1 << 16
MIN_PARALLEL_MACS = 1 << 22


def cpu_count() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Pool:
    """``threads - 1`` worker threads; the calling thread is the first worker."""

    def __init__(self, threads: int):
        self.threads = threads
        self._executor = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="cnnc") if threads > 1 else None
        )
        self._scratch: list[np.ndarray | None] = [None] * threads
        # What a task sees as the current pool: one thread, with its worker's own scratch.
        self._inner = [self] if threads == 1 else [Pool(1) for _ in range(threads)]

    def scratch(self, worker: int, size: int, dtype: np.dtype = np.float32) -> np.ndarray:
        """``size`` values of ``dtype`` (float32 unless said) of ``worker``'s own scratch
        memory, reused by every kernel of a run (a kernel must not return a view of it)."""
        buffer = self._scratch[worker]
        if dtype == np.float32:
            if buffer is None or buffer.size < size:
                buffer = self._scratch[worker] = np.empty(size, np.float32)
            return buffer[:size]
        # Another type (float64) views the same memory, grown to hold ``size`` of it.
        floats = size * np.dtype(dtype).itemsize // 4
        if buffer is None or buffer.size < floats:
            buffer = self._scratch[worker] = np.empty(floats, np.float32)
        return buffer[:floats].view(dtype)

    def release(self) -> None:
        """Free the scratch memory (at the end of a run)."""
        self._scratch = [None] * self.threads
        for inner in self._inner:
            if inner is not self:
                inner.release()

    def map(self, task: Callable[[int, int], None], count: int) -> None:
        """Run ``task(i, worker)`` for every i in range(count), handing each i to the next
        free thread; ``worker`` (0 ≤ worker < threads) names the thread, so that a task can
        use that thread's own scratch buffers."""
        workers = min(self.threads, count)
        if workers <= 1:
            for i in range(count):
                task(i, 0)
            return
        counter = itertools.count()  # next() on it is atomic under the GIL
        # NumPy's floating-point error handling is the caller's in every thread (the
        # interpreter lets NaN and inf go silently; a new thread would warn).
        errors_handling = np.geterr()

        def drain(worker: int) -> None:
            # A task runs its own pieces serially: the other threads are busy.
            outer = getattr(_local, "pool", None)
            _local.pool = self._inner[worker]
            try:
                with np.errstate(**errors_handling):
                    while (i := next(counter)) < count:
                        task(i, worker)
            finally:
                if outer is None:
                    del _local.pool
                else:
                    _local.pool = outer

        assert self._executor is not None
        futures = [self._executor.submit(drain, w) for w in range(1, workers)]
        try:
            drain(0)
        finally:
            # Every task must be done with shared buffers before anyone reuses them.
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error


_SERIAL = Pool(1)
_local = threading.local()


def current() -> Pool:
    """The pool of the interpreter running on this thread (serial outside a run)."""
    return getattr(_local, "pool", _SERIAL)


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """``range(count)`` cut into at most ``parts`` nearly equal (start, stop) pieces."""
    parts = max(1, min(parts, count))
    bounds = [count * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def pieces(count: int, elements: int = 0, macs: int = 0) -> list[tuple[int, int]]:
    """Pieces of ``range(count)`` (channels, rows) for the current pool: one per thread
    when the work (``elements`` of memory passes, ``macs`` of products) is large enough
    to share, else one."""
    threads = current().threads
    worth = elements >= MIN_PARALLEL_ELEMENTS * threads or macs >= MIN_PARALLEL_MACS * threads
    return split(count, threads if worth else 1)


def share(count: int, work: Callable[[slice], None], elements: int = 0, macs: int = 0) -> None:
    """``work(piece)`` on the pieces of ``range(count)`` that :func:`pieces` gives, each
    piece a slice, on the current pool's threads."""
    shares = pieces(count, elements, macs)
    current().map(lambda i, worker: work(slice(*shares[i])), len(shares))


_blas = None


def _blas_controller():
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


@contextmanager
def using(threads: int) -> Iterator[Pool]:
    """Run kernels on this thread with ``threads`` threads, and BLAS single-threaded."""
    # Each calling thread has pools of its own: two interpreters running at once on two
    # threads never share scratch memory.
    pools = _local.__dict__.setdefault("pools", {})
    pool = pools.get(threads)
    if pool is None:
        pool = pools[threads] = Pool(threads)
    previous = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        with _blas_controller().limit(limits=1):
            yield pool
    finally:
        pool.release()
        if previous is None:
            del _local.pool
        else:
            _local.pool = previous
