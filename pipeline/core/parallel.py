"""Row work spread over forked worker processes, results in order.

The stages' per-row work (render's templates and tokenization, prepare's safety rules and
contamination n-grams) is pure Python, so threads do not help; processes do. Workers are
forked after the inputs are in memory: they inherit ``state`` (rows, tokenizer, rules)
instead of receiving it pickled, and only the small task descriptions and the results
travel. Off Linux (no safe ``fork``), or when the work is small, everything runs in-process,
through the same function: the output cannot depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
from itertools import chain
from typing import Any, Callable, Generator, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 4096  # rows per task handed to a worker
MIN_ROWS = 2 * CHUNK  # fewer rows than this run in-process: forking would cost more than it saves

# (fn, state) of the map being started: set while the pool forks, so each worker inherits it.
_CURRENT: tuple[Callable[[Any, Any], Any], Any] | None = None


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for a block of row work; usable as a decorator.

    Row work allocates millions of lists and dicts that hold no reference cycles, so
    reference counting frees them all; the collector would only walk the ever larger heap
    again and again (a quarter of render's time at 100k rows), and in a forked worker each
    pass writes to every inherited object's header, copying the pages it shares with the
    parent. Workers forked inside the block inherit it. Restored as it was on the way out.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def workers() -> int:
    """Processes to use: the CPUs this process may run on (at most 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def chunks(n: int, size: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n)``, ``size`` (default :data:`CHUNK`) items each."""
    size = size or CHUNK
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _call(task: Any) -> Any:
    assert _CURRENT is not None
    fn, state = _CURRENT
    return fn(state, task)


def _init_worker() -> None:
    # A forked worker inherits the parent's Python signal handlers (Lightning installs one for
    # SIGTERM): the pool's terminate() would then not end a worker waiting for a task. Ctrl-C
    # is the parent's to handle; it then terminates the workers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked across the fork: see fork_map
    # One process per CPU already: a tokenizer's own thread pool would only contend with the others.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def fork_map(fn: Callable[[T, Any], R], state: T, tasks: Sequence[Any], parallel: bool = True,
             n_workers: int | None = None) -> Generator[R, None, None]:
    """``fn(state, task)`` for each task, in task order, in forked workers when ``parallel``.

    ``fn`` must be a module-level function. Each worker has its own copy of ``state``, so
    a cache inside it is per process. The workers are forked and sent the tasks when this is
    called, and the results are collected as the returned generator is consumed: the caller
    may do other work in between. Consume it to the end, or ``close()`` it to end the
    workers. An exception in a worker is raised here, as is. In-process, ``fn`` runs as the
    results are consumed.
    """
    global _CURRENT
    n_workers = workers() if n_workers is None else n_workers
    # Linux only: macOS offers fork, but system frameworks loaded in the parent make it unsafe there.
    forked = parallel and n_workers > 1 and len(tasks) > 1 and sys.platform.startswith("linux")
    if not forked:
        return (fn(state, task) for task in tasks)
    _CURRENT = (fn, state)
    # SIGTERM stays blocked across the fork until _init_worker has restored its default action:
    # a worker inherits the parent's Python handler (Lightning's) until then, and a SIGTERM
    # caught by it in between would be dropped (Python drops a signal whose handler is SIG_DFL
    # by the time it runs), leaving pool.terminate() waiting on a live worker forever.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:  # the workers fork here and inherit (fn, state)
        pool = multiprocessing.get_context("fork").Pool(min(n_workers, len(tasks)), _init_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _CURRENT = None
    results = _collect(pool, pool.imap(_call, tasks))
    next(results)  # started: from here on, close() ends the workers
    return results


def _collect(pool: Any, results: Iterator[R]) -> Generator[R, None, None]:
    try:
        yield  # type: ignore[misc]  # where fork_map leaves it, before the first result
        yield from results
    except BaseException:  # a worker's error, or the caller stopped early (GeneratorExit)
        pool.terminate()
        raise
    else:
        pool.close()  # every result is in: the workers leave their loop and exit
    finally:
        pool.join()


def map_rows(fn: Callable[[T, tuple[int, int]], list[R]], state: T, n: int, parallel: bool = True) -> list[R]:
    """``fn(state, (start, stop))`` over :func:`chunks` of ``range(n)``, the lists it returns joined
    in row order; forked (:func:`fork_map`) when ``parallel`` and there are :data:`MIN_ROWS` rows."""
    return joined(start_rows(fn, state, n, parallel))


def start_rows(fn: Callable[[T, tuple[int, int]], list[R]], state: T, n: int,
               parallel: bool = True) -> Generator[list[R], None, None]:
    """:func:`map_rows` started now (workers forked, chunks sent): the chunks' lists, in order, as
    the result is consumed (:func:`joined`). The calling process is free in between: its own
    work then runs beside the workers'. ``close()`` the result to give up."""
    return fork_map(fn, state, chunks(n), parallel=parallel and n >= MIN_ROWS)


def joined(parts: Iterator[list[R]]) -> list[R]:
    """The lists of :func:`start_rows` (waited for), joined in row order."""
    return list(chain.from_iterable(parts))
