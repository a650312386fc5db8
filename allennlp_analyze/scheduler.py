"""Scheduling the matrices of a run over the CPU cores: how many workers
(:func:`resolve_workers`), a bounded map that keeps each worker busy (:func:`bounded_map`), the
idle cores lent to the running matrices' Gram panels (:class:`Cores`), BLAS held at a thread
count (:func:`blas_threads`) and the progress bar on stderr (:func:`progress_bar`).

Nothing here changes a result: the panels are fixed by a matrix's shape and BLAS runs at one
thread per matrix, whatever the worker count or the order.
"""

import contextlib
import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from typing import Callable, Iterable, Iterator, List, Optional, Set, TypeVar

from .errors import escape
from .options import AnalysisOptions
from .spectrum import enable_scratch

T = TypeVar("T")
R = TypeVar("R")


class Cores:
    """CPU cores that no matrix occupies, lent to the Gram panels of the matrices running
    (a :data:`~allennlp_analyze.spectrum.Parallel`): the cores beyond the workers, and once
    every matrix has been handed out (``drained``), those of the workers that finished. Busy
    threads never exceed the cores; results never depend on it (the panels are fixed by the
    matrix's shape)."""

    def __init__(self, cores: int, workers: int):
        self.cores, self.workers = cores, workers
        self.running = self.lent = 0
        self.drained = False
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(cores - 1) if cores > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()
        return False

    def update(self, running: int = 0, drained: bool = False) -> None:
        with self._lock:
            self.running += running
            self.drained = self.drained or drained

    def lend(self, tasks: List[Callable[[], None]]) -> None:
        """Run independent ``tasks``, on as many free cores as there are (this thread too)."""
        pool = self._pool
        with self._lock:
            busy = self.running if self.drained else self.workers
            n = max(0, min(self.cores - busy - self.lent, len(tasks) - 1)) if pool else 0
            self.lent += n
        pending = iter(tasks)
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    task = next(pending, None)
                if task is None:
                    return
                task()

        helpers = [pool.submit(drain) for _ in range(n)] if pool is not None else []
        try:
            drain()
        finally:
            for h in helpers:
                h.result()
            with self._lock:
                self.lent -= n


def cpu_count() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def has_threadpoolctl() -> bool:
    """Whether threadpoolctl (which holds BLAS at a thread count) is installed."""
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_workers(options: AnalysisOptions) -> int:
    """Matrices analyzed at once: ``options.workers``, or for 0 one per CPU core (at most 8)
    when threadpoolctl can keep BLAS at one thread per worker, else 1 (BLAS's own threads).
    Torch devices get 1."""
    if options.workers:
        return options.workers
    if options.device is not None or not has_threadpoolctl():
        return 1
    return max(1, min(cpu_count(), 8))


def blas_threads(limit: Optional[int]):
    """Limit BLAS/LAPACK to ``limit`` threads (each) while active, via threadpoolctl; no-op for
    None or without threadpoolctl (explicit ``workers`` > 1 then shares the cores with BLAS's own
    threads)."""
    if limit is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, cores: Optional[Cores] = None
) -> Iterator[R]:
    """``fn`` of each of ``items``, yielded as they complete, ``workers`` at a time, holding at
    most ``workers`` items (the next is taken as soon as any finishes: a large matrix never
    holds a worker idle behind it); ``cores`` learns how many run and when the last one was
    handed out.
    Each thread reuses its spectral working buffers (``spectrum.enable_scratch``); worker
    threads drop theirs when they end, the caller's thread must ``release_scratch()``."""
    cores = cores or Cores(1, workers)
    if workers == 1:
        enable_scratch()
        yield from map(fn, items)
        return

    def run(item: T) -> R:
        try:
            return fn(item)
        finally:
            cores.update(running=-1)

    with ThreadPoolExecutor(workers, initializer=enable_scratch) as pool:
        pending: Set[Future] = set()
        for item in items:
            cores.update(running=1)
            pending.add(pool.submit(run, item))
            if len(pending) >= workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        cores.update(drained=True)
        for future in as_completed(pending):
            yield future.result()


class _NoBar:
    total = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass

    def refresh(self) -> None:
        pass


def progress_bar(total: int, label: str, progress: Optional[bool], unit: str = "matrix"):
    """A tqdm bar over matrices (or ``unit``) on stderr: shown when ``progress`` is True, or
    when it is None and stderr is a terminal; a no-op when tqdm is not installed."""
    show = sys.stderr.isatty() if progress is None else progress
    try:
        from tqdm import tqdm
    except ImportError:
        show = False
    if not show:
        return _NoBar()
    return tqdm(total=total, desc=escape(label), unit=unit, file=sys.stderr, leave=False)
