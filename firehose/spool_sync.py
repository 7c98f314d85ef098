"""The spool's fsync thread: group commit without a hand-off between the event loop and the
thread before each fsync.

The event loop writes frames; this thread fsyncs them. After each fsync it looks at once for
what was written meanwhile and fsyncs again, while the loop is told (``call_soon_threadsafe``)
which writes are now durable. Handing each fsync to an executor instead made every cycle wait
for the loop twice (to learn the last fsync's result, then to submit the next); under load the
loop runs a queue of request callbacks first, and at 200 MiB/s through 8 connections each
cycle took 7.8 ms for a 2.6 ms fsync (bench/RESULTS.md).

What a cycle covers is taken under :attr:`SyncThread.lock` by the ``take`` callback, in this
thread. The owner holds the same lock while it changes what ``take`` reads (the file being
written, files to close, the directory's dirty flag, unlinks waiting for their commit), so a
cycle never sees a file both written and closed. Anything written before ``take`` ran is covered
by the cycle's fsync: the owner counts a write only once ``os.write`` has returned.

A cycle covers what the owner asked for (``fsync: always`` asks after every acknowledged append;
``interval`` and ``never`` only on their timer, a seal or a deletion), so those policies do not
turn into fsyncs back to back. A failed fsync (or anything else raised in the thread) stops it for
good and the owner fences itself: a retried fsync can falsely succeed. An idle thread exits after
a few seconds and the next :meth:`SyncThread.kick` starts another (one that cannot start is tried
again half a second later), so a spool abandoned without ``aclose`` (a crash simulated in a test)
leaves no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import structlog

Job = TypeVar("Job")

IDLE_EXIT_SECS = 5.0
START_RETRY_SECS = 0.5

log = structlog.get_logger()


class SyncJob(NamedTuple):
    """One cycle of a spool's sync thread: the append count it covers and what it fsyncs."""

    target: int
    fds: list[int]  # the file being written
    closing: list[int]  # files rolled over from: fsynced, then closed
    dir_dirty: bool  # a file was created or deleted
    unlinks: list[str]  # deleted only now that the commits that freed them are on disk
    active: Any  # the segment being written, and its size when the cycle was taken
    active_size: int


def fsync_job(job: SyncJob, dir_fd: int) -> None:
    try:
        for fd in job.closing:
            os.fsync(fd)
    finally:
        for fd in job.closing:  # closed even after a failure: the spool fences, nothing leaks
            with contextlib.suppress(OSError):
                os.close(fd)
    for fd in job.fds:
        os.fsync(fd)
    if job.dir_dirty:
        os.fsync(dir_fd)
    if job.unlinks:
        # Only now are the commits (and a rolled-over segment's successor) on disk.
        for path in job.unlinks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.fsync(dir_fd)


class SyncThread(Generic[Job]):
    """Runs ``take() -> job | None`` (under :attr:`lock`) and ``run(job)`` in a thread of its own
    until ``take`` finds nothing to do; ``done(job)`` and ``failed(exc)`` are called on the event
    loop that last called :meth:`kick`."""

    def __init__(self, name: str, take: Callable[[], Job | None], run: Callable[[Job], None],
                 done: Callable[[Job], None], failed: Callable[[OSError], None]) -> None:
        self.name = name
        self.lock = threading.Lock()
        self._take, self._run_job, self._done, self._failed = take, run, done, failed
        self._cv = threading.Condition(threading.Lock())  # not the default RLock: kick() runs per request
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wanted = False
        self._stopping = False
        self._error: OSError | None = None
        self._retrying = False  # a start that failed is tried again (call_later)
        self._abandoned = False

    def kick(self) -> None:
        """Something was written (or closed, or unlinked): make sure a cycle covers it. Called on
        the event loop."""
        with self._cv:
            if self._error is not None or self._stopping:
                return
            self._wanted = True
            self._loop = asyncio.get_running_loop()
            if self._thread is None:
                thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # out of threads for now: the waiters wait, then it is tried again
                    if not self._retrying:
                        self._retrying = True
                        log.warning("spool_sync_thread_not_started", error=str(exc), retry_in_secs=START_RETRY_SECS)
                        self._loop.call_later(START_RETRY_SECS, self._retry)
                    return
                self._thread = thread
            else:
                self._cv.notify()

    def abandon(self) -> None:
        """No further cycle (one under way ends first): what a ``kill -9`` leaves."""
        with self._cv:
            self._stopping = self._abandoned = True
            thread = self._thread
            self._cv.notify()
        if thread is not None:
            thread.join(5)

    def _retry(self) -> None:
        self._retrying = False
        self.kick()

    async def close(self) -> None:
        """Run the cycles still needed (the owner's last unlinks included), then stop the thread."""
        with self._cv:
            self._stopping = True
            thread = self._thread
            self._cv.notify()
        while thread is not None and thread.is_alive():  # polled: needs no executor thread to wait in
            await asyncio.sleep(0.002)

    def _main(self) -> None:
        try:
            self._cycles()
        except BaseException as exc:  # noqa: BLE001 - the owner must learn that nothing syncs any more
            error = exc if isinstance(exc, OSError) else OSError(f"the sync thread failed: {exc!r}")
            with self._cv:
                self._error = error
                self._thread = None
            self._post(self._failed, error)

    def _cycles(self) -> None:
        while True:
            with self._cv:
                if self._abandoned:
                    self._thread = None
                    return
                self._wanted = False
            with self.lock:
                job = self._take()
            if job is not None:
                self._run_job(job)  # an OSError ends the thread: see _main
                self._post(self._done, job)
                continue
            with self._cv:
                if not self._wanted and not self._stopping:
                    self._cv.wait(IDLE_EXIT_SECS)
                if not self._wanted:  # idle, or closing with nothing left to do
                    self._thread = None
                    return

    def _post(self, callback: Callable[[Any], None], arg: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:
            pass  # the loop is closed: the spool was abandoned without aclose (a simulated crash)
