"""The background drawing worker: order, bounded queue, errors on the caller's thread, inline mode, clean close."""

from __future__ import annotations

import threading
import time
import traceback

import pytest

from lightning_interp._logging import WORKER_THREAD_NAME, DrawingWorker


def _worker_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == WORKER_THREAD_NAME]


def test_jobs_run_in_submission_order_on_one_other_thread_and_close_ends_it():
    worker = DrawingWorker(depth=2)
    ran: list[tuple[int, str]] = []
    for index in range(10):
        worker.submit(lambda index=index: ran.append((index, threading.current_thread().name)))
    worker.close()
    assert [index for index, _ in ran] == list(range(10))
    assert {name for _, name in ran} == {WORKER_THREAD_NAME}
    assert not worker.alive and not _worker_threads()
    assert len(worker.job_seconds) == 10


def test_an_unused_worker_starts_no_thread():
    worker = DrawingWorker()
    worker.drain()
    assert not worker.alive and not _worker_threads()
    worker.close()


def test_submit_waits_while_the_queue_is_full():
    release = threading.Event()
    worker = DrawingWorker(depth=1)
    worker.submit(release.wait)  # taken by the thread at once, which then blocks
    deadline = time.monotonic() + 5
    while worker._jobs.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.submit(lambda: None)  # fills the one queue slot
    submitted = threading.Event()
    waiter = threading.Thread(target=lambda: (worker.submit(lambda: None), submitted.set()))
    waiter.start()
    assert not submitted.wait(0.3), "a third job must wait for room in the queue"
    release.set()
    assert submitted.wait(5)
    waiter.join()
    worker.close()


def broken_drawing() -> None:
    raise ValueError("cannot draw this")


def test_a_failing_job_raises_on_the_callers_thread_with_its_own_traceback_and_later_jobs_are_skipped():
    worker = DrawingWorker()
    ran = []
    worker.submit(broken_drawing)
    worker.submit(lambda: ran.append("after"))
    with pytest.raises(ValueError, match="cannot draw this") as caught:
        worker.drain()
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "broken_drawing" in frames, frames  # the frame where it went wrong, on the worker thread
    assert ran == [], "jobs after a failure are skipped"
    assert any("background_drawing=False" in note for note in getattr(caught.value, "__notes__", []))
    worker.drain()  # raised once only
    worker.close()
    assert not _worker_threads()


def test_the_error_surfaces_at_the_next_submit_too():
    worker = DrawingWorker()
    worker.submit(broken_drawing)
    worker._jobs.join()
    with pytest.raises(ValueError, match="cannot draw this"):
        worker.submit(lambda: None)
    worker.close()


def test_close_without_raising_returns_the_error():
    worker = DrawingWorker()
    worker.submit(broken_drawing)
    error = worker.close(raise_errors=False)
    assert isinstance(error, ValueError)
    assert not _worker_threads()


def test_inline_jobs_run_at_once_on_the_calling_thread():
    worker = DrawingWorker()
    seen = []
    worker.submit(lambda: seen.append(threading.current_thread().name), inline=True)
    assert seen == [threading.current_thread().name]
    assert not worker.alive
    with pytest.raises(ValueError, match="cannot draw"):
        worker.submit(broken_drawing, inline=True)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        DrawingWorker(depth=0)
