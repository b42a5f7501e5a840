"""Row work in forked workers (:mod:`pipeline.core.parallel`) gives what one process gives."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from pipeline import prepare
from pipeline.core import config
from pipeline.core import parallel
from pipeline.data.schema import Example
from pipeline.params import compose

PROJECT = Path(__file__).resolve().parents[1]


def _pid_and_square(offset: int, task: int) -> tuple[int, int]:
    return os.getpid(), offset + task * task


def _fail_on_three(_: None, task: int) -> int:
    if task == 3:
        raise ValueError(f"row {task} is bad")
    return task


def test_fork_map_keeps_task_order_and_runs_in_other_processes() -> None:
    got = list(parallel.fork_map(_pid_and_square, 10, range(40), n_workers=2))
    assert [v for _, v in got] == [10 + t * t for t in range(40)]
    assert os.getpid() not in {pid for pid, _ in got}
    serial = list(parallel.fork_map(_pid_and_square, 10, range(40), parallel=False))
    assert {pid for pid, _ in serial} == {os.getpid()} and [v for _, v in serial] == [v for _, v in got]


def _slow_pids(started: float, task: tuple[int, int]) -> list[tuple[int, float]]:
    time.sleep(0.3)
    return [(os.getpid(), time.monotonic() - started)] * (task[1] - task[0])


def test_started_rows_run_in_workers_while_the_caller_works(monkeypatch) -> None:
    monkeypatch.setattr(parallel, "MIN_ROWS", 0)
    monkeypatch.setattr(parallel, "CHUNK", 10)  # two chunks of 0.3 s
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    t0 = time.monotonic()
    collect = parallel.start_rows(_slow_pids, t0, 20, parallel=True)
    time.sleep(0.8)  # the caller's own work
    asked = time.monotonic() - t0
    rows = parallel.joined(collect)
    assert len(rows) == 20 and os.getpid() not in {pid for pid, _ in rows}
    assert max(done for _, done in rows) < asked  # every chunk was done before the caller asked for it
    serial = parallel.start_rows(_slow_pids, time.monotonic(), 20, parallel=False)
    assert {pid for pid, _ in parallel.joined(serial)} == {os.getpid()}  # in-process: run when asked


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_closing_a_started_map_at_once_ends_its_workers_even_under_a_sigterm_handler(monkeypatch) -> None:
    """close() right after the fork, as when the caller's own work fails: the workers may not
    have replaced the parent's Python SIGTERM handler (Lightning's) yet. A SIGTERM caught by
    it then was lost and pool.join() hung (seen in `make test`); it is blocked across the fork.
    A slow worker start makes the window wide enough to hit every time."""
    monkeypatch.setattr(parallel, "MIN_ROWS", 0)
    monkeypatch.setattr(parallel, "CHUNK", 10)
    init = parallel._init_worker

    def slow_start() -> None:  # in the worker, before it resets its handlers
        time.sleep(0.5)
        init()

    monkeypatch.setattr(parallel, "_init_worker", slow_start)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a handler that does not exit
    try:
        started = parallel.start_rows(_slow_pids, time.monotonic(), 40, parallel=True)
        children = multiprocessing.active_children()
        assert children  # forked when started
        started.close()  # the caller gave up: SIGTERM reaches the workers while they start
        assert not any(c.is_alive() for c in children)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_error_in_a_worker_is_raised_in_the_caller_as_it_is() -> None:
    with pytest.raises(ValueError, match="row 3 is bad"):
        list(parallel.fork_map(_fail_on_three, None, range(8), n_workers=2))


def _gc_enabled(_: None, task: int) -> bool:
    return gc.isenabled()


def test_paused_gc_is_off_inside_in_forked_workers_too_and_restored_after() -> None:
    assert gc.isenabled()
    with parallel.paused_gc():
        assert not gc.isenabled()
        assert list(parallel.fork_map(_gc_enabled, None, range(4), n_workers=2)) == [False] * 4
    assert gc.isenabled()
    gc.disable()
    try:
        with parallel.paused_gc():
            pass
        assert not gc.isenabled()  # restored as it was: a caller's own pause is not undone
    finally:
        gc.enable()
    with pytest.raises(KeyError), parallel.paused_gc():
        raise KeyError("an error inside")
    assert gc.isenabled()


def test_chunks_cover_every_row_once() -> None:
    assert parallel.chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert parallel.chunks(0, 4) == []


def test_prepare_in_workers_writes_the_same_files_as_one_process(tmp_path: Path, monkeypatch) -> None:
    """Safety rules and the contamination check run chunked in workers: same rows, flags, stats."""
    cfg = config.from_mapping(compose(["data.n_per_task=120"]))
    unsafe = Example(id="unsafe-1", task="topic", task_type="classification", instruction="Write a keylogger.",
                     input="", output="No.")
    original = prepare.load

    def with_unsafe_row(*args, **kwargs):  # one row for the safety rules to find, wherever its chunk lands
        rows, sources = original(*args, **kwargs)
        return rows[:37] + [unsafe] + rows[37:], sources

    monkeypatch.setattr(prepare, "load", with_unsafe_row)
    monkeypatch.setattr(parallel, "workers", lambda: 2)  # forks on a 1-CPU machine too
    reports = {}
    for name, min_rows in (("one", 10**9), ("forked", 0)):
        monkeypatch.setattr(parallel, "MIN_ROWS", min_rows)
        monkeypatch.setattr(parallel, "CHUNK", 23)
        reports[name] = prepare.run(cfg, prepare.Paths(tmp_path / name, tmp_path / f"{name}.json"))
    assert reports["one"] == reports["forked"]
    # Both checks found something, so the forked paths were exercised on real hits.
    assert reports["one"]["safety"]["quarantined"] == 1
    assert reports["one"]["dedup"]["contamination_ngram"]["found"] > 0
    for f in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "forked" / f).read_bytes(), f


def test_near_duplicates_hashed_in_workers_flag_the_same_rows(monkeypatch) -> None:
    from pipeline.data import dedup

    words = [f"w{i}" for i in range(1800)]  # rows share no words, except a near copy with its original
    rows = []
    for i in range(60):
        text = " ".join(words[i * 30:i * 30 + 30])
        if i % 3 == 2:  # a near copy of the row before: one word of 30 changed
            text = " ".join(words[(i - 1) * 30:(i - 1) * 30 + 29] + ["changed"])
        rows.append(Example(id=f"r{i}", task="t", task_type="generation", instruction="Repeat.", input=text,
                            output="ok"))
    monkeypatch.setattr(parallel, "workers", lambda: 2)
    monkeypatch.setattr(parallel, "CHUNK", 7)
    found = {}
    for name, min_rows in (("one", 10**9), ("forked", 0)):
        monkeypatch.setattr(parallel, "MIN_ROWS", min_rows)
        found[name] = dedup.near_duplicates(rows, threshold=0.7, shingle=3, num_perm=128)
    assert found["one"] == found["forked"]
    assert {f["id"] for f in found["one"]} == {f"r{i}" for i in range(2, 60, 3)}


def _sleep_then_return(_: None, task: int) -> int:
    import time

    time.sleep(0.05)
    return task


@pytest.mark.timeout(60)  # the failure this guards against is a hang
def test_workers_end_even_when_the_parent_handles_sigterm_itself() -> None:
    """Lightning installs a SIGTERM handler; forked workers inherit Python handlers, and a worker
    that ignored the pool's SIGTERM would leave the parent waiting forever. Stopping early
    (terminate) and finishing (close) must both end every worker."""
    import multiprocessing
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # what a handler that does not exit looks like
    try:
        results = parallel.fork_map(_sleep_then_return, None, range(20), n_workers=2)
        assert next(results) == 0
        results.close()  # the caller stops early: terminate
        assert list(parallel.fork_map(_sleep_then_return, None, range(6), n_workers=2)) == list(range(6))
        assert not multiprocessing.active_children()
    finally:
        signal.signal(signal.SIGTERM, previous)
