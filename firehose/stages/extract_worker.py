"""The extraction worker: one child process per daemon that runs :func:`extract_frame` for every
stream extracting partition keys inline (``firehose/stages/inline.py``). A frame in a spool file
is read by the worker itself (``extract_stored``): the daemon sends where it is, not its records.

The daemon talks to it over the child's stdin and stdout, read and written by the daemon's own
event loop (an asyncio subprocess protocol): a request is written when the batcher asks for a
frame's keys, and the answer wakes the batcher from the loop's I/O callback, with no thread and
no task in between. (A
``ProcessPoolExecutor`` hands every request and every answer through a thread of its own in the
daemon, and under load each handoff waits its turn for the interpreter lock behind the busy loop:
about 10 ms a frame, which left the batcher waiting on most frames.)

Messages both ways are an 8-byte little-endian length and a pickle. Pickle is safe here: both
ends are this program, over a pipe no one else holds. Requests are answered in order, one at a
time; the first message the worker writes says it is ready. The worker exits when its stdin
closes (the daemon stopped, or died: the kernel closes the pipe even after ``kill -9``) and, on
Linux, is killed with the daemon besides (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import structlog

_HEADER = struct.Struct("<Q")
_READY = b"firehose-extract-worker ready"
#: No answer is this large (a frame's is a few bytes a record): a longer length is not ours.
_MAX_ANSWER = 64 << 20
#: The pipe buffer asked for the requests (a frame is up to a few MiB; Linux's default is 64 KiB).
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031
#: An answer later than this: the worker is stuck (stopped, frozen); it is killed and replaced.
ANSWER_TIMEOUT_SECS = 30.0
#: Not ready this long after it started: killed, and tried again later.
START_TIMEOUT_SECS = 60.0


class WorkerFailed(RuntimeError):
    """The worker process died or answered with an error; the caller extracts in the daemon."""


# --------------------------------------------------------------------------- the worker process
def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the daemon dies, even by kill -9."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, ImportError):
        return
    if os.getppid() != parent:  # the daemon died before the call above
        os._exit(1)


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, _PIPE_BYTES))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(parent: int) -> None:
    """The worker's loop: read a request, extract, answer; return at the end of the input."""
    import signal

    from firehose.stages.inline import RECORDS, STORED, extract_frame, extract_stored

    calls: dict[str, Callable[..., Any]] = {RECORDS: extract_frame, STORED: extract_stored}

    # Ctrl-C and systemd's stop reach the whole process group; the daemon decides when this ends
    # (the end of its input, or SIGKILL), so frames in flight at a graceful stop are answered.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    for fd in (0, 1):  # larger pipes both ways (either end may set it): fewer wake-ups a frame
        with contextlib.suppress(OSError, ImportError):
            import fcntl

            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
    out = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the answers
    sys.stdout = sys.stderr
    _write_all(out, _HEADER.pack(len(_READY)) + _READY)
    while True:
        head = _read_exactly(0, _HEADER.size)
        body = _read_exactly(0, _HEADER.unpack(head)[0]) if head is not None else None
        if body is None:
            return
        try:
            call, *args = pickle.loads(body)
            answer: tuple[bool, Any] = (True, calls[call](*args))
        except Exception as exc:  # noqa: BLE001 - reported to the daemon, which extracts itself
            answer = (False, f"{type(exc).__name__}: {exc}")
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            _write_all(out, _HEADER.pack(len(data)) + data)
        except BrokenPipeError:  # the daemon is gone
            return


# --------------------------------------------------------------------------- the daemon's side
_BOOT = ("import sys; sys.path[:] = {path!r}; "
         "from firehose.stages.extract_worker import serve; serve({parent})")


def _interpreter_flags() -> list[str]:
    """The daemon's interpreter options (-I, -O, -s, ...) for the worker, as multiprocessing's
    spawn passes them."""
    try:
        return list(subprocess._args_from_interpreter_flags())  # type: ignore[attr-defined]
    except AttributeError:  # not in this Python
        return []


class _Pipes(asyncio.SubprocessProtocol):
    """The worker's stdout, split into messages as it arrives (in the loop's own I/O callback:
    an answer wakes its caller on the next turn of the loop)."""

    def __init__(self, owner: SharedWorker) -> None:
        self.owner = owner
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)  # asyncio's or uvloop's
        self.owner._connected(self)  # before any of its output can arrive

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1:
            return
        buf = self._buf
        buf += data if isinstance(data, bytes) else data.encode()
        while len(buf) >= _HEADER.size:
            n = _HEADER.unpack_from(buf)[0]
            if n > _MAX_ANSWER:  # something else wrote to its stdout (a sitecustomize's print)
                buf.clear()
                self.owner._garbled(self)
                return
            end = _HEADER.size + n
            if len(buf) < end:
                break
            message = bytes(buf[_HEADER.size:end])
            del buf[:end]
            self.owner._answer(self, message)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self.owner._exited(self)

    def process_exited(self) -> None:
        self.owner._exited(self)
        if not self.exited.done():
            self.exited.set_result(None)


class SharedWorker:
    """The daemon's one extraction worker, shared by every stream that extracts inline (in
    cluster mode a daemon runs each stream's partitions as separate runtimes). It is started on
    first use and stopped when the last of them stops. One that fails (cannot start, dies, does
    not answer, answers garbage) is killed and started again on a later use, after a pause that
    doubles with each failure up to a minute and resets once one is ready; meanwhile the streams
    extract in the daemon. All methods run on the event loop."""

    def __init__(self) -> None:
        self.pipes: _Pipes | None = None
        self.ready = False  # it said it is ready
        self._retry_at = 0.0  # time.monotonic() before which no worker is started (after a failure)
        self._backoff = 0.0
        self._started_at = 0.0
        self.users: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()

    @property
    def pid(self) -> int | None:
        transport = self.pipes.transport if self.pipes is not None else None
        return transport.get_pid() if transport is not None else None

    def acquire(self, user: object) -> None:
        """``user`` uses the worker; it is started (in the background) if it is not running."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a loop that ended without stopping it (tests run many loops)
            self._abandon()
            self._loop = loop
        self.users.add(id(user))
        if self.pipes is not None and not self.ready and time.monotonic() - self._started_at > START_TIMEOUT_SECS:
            self._fail(f"the extraction worker was not ready within {START_TIMEOUT_SECS:g} s")
        if self.pipes is None and self._starting is None and time.monotonic() >= self._retry_at:
            self._starting = loop.create_task(self._start())

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _transport, pipes = await loop.subprocess_exec(
                lambda: _Pipes(self), sys.executable, *_interpreter_flags(), "-c",
                _BOOT.format(path=list(sys.path), parent=os.getpid()),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        except Exception as exc:  # noqa: BLE001 - whatever it is, extract in the daemon
            self._pause(f"the extraction worker cannot start: {type(exc).__name__}: {exc}")
            return
        finally:
            self._starting = None
        if not self.users and pipes is self.pipes:  # released while it started
            self.stop()

    def _connected(self, pipes: _Pipes) -> None:
        self.pipes, self.ready, self._started_at = pipes, False, time.monotonic()

    def _answer(self, pipes: _Pipes, message: bytes) -> None:
        if pipes is not self.pipes:
            return
        if not self.ready:
            if message != _READY:
                self._garbled(pipes)
                return
            self.ready = True
            self._backoff = 0.0
            return
        if not self._waiting:
            self._fail("the extraction worker answered a request it was not sent")
            return
        fut = self._waiting.popleft()  # first: whatever the answer is, it is this request's
        try:
            answer = pickle.loads(message)
        except Exception as exc:  # noqa: BLE001 - a worker of another version, a damaged answer
            self._fail(f"the extraction worker's answer cannot be read: {type(exc).__name__}: {exc}")
            if not fut.done():
                fut.set_exception(WorkerFailed("the extraction worker's answer cannot be read"))
                fut.exception()
            return
        if not fut.done():
            fut.set_result(answer)

    def _garbled(self, pipes: _Pipes) -> None:
        """Its output is not this protocol: something else writes to its stdout."""
        if pipes is self.pipes:
            self._fail("the extraction worker's output is not its answers")

    def _exited(self, pipes: _Pipes) -> None:
        if pipes is not self.pipes:
            return
        code = pipes.transport.get_returncode() if pipes.transport is not None else None
        when = "before it was ready" if not self.ready else "while in use"
        self._fail(f"the extraction worker exited {when} (exit status {code})")

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Send one call (its name, :data:`~firehose.stages.inline.RECORDS` or ``STORED``, and
        arguments); the future is its answer, ``(True, result)`` or ``(False, error)``, or fails
        with :class:`WorkerFailed`. Only while :attr:`ready`."""
        pipes = self.pipes
        assert pipes is not None and pipes.transport is not None and self._loop is not None
        stdin = pipes.transport.get_pipe_transport(0)
        if stdin is None or stdin.is_closing():
            raise WorkerFailed("the extraction worker exited")
        data = pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiting.append(fut)
        cast(asyncio.WriteTransport, stdin).write(_HEADER.pack(len(data)) + data)
        return fut

    def _fail(self, why: str, *, failure: bool = True) -> None:
        """The worker is gone (killed if it still runs): every waiting call fails, and a later use
        starts another (after a pause, for a ``failure``)."""
        if failure and self.pipes is not None:
            self._pause(why)
        pipes, self.pipes, self.ready = self.pipes, None, False
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(WorkerFailed(why))
                fut.exception()  # a frame read ahead and passed is never awaited: no warning for it
        if pipes is not None and pipes.transport is not None:
            pipes.transport.close()  # kills the process if it still runs

    async def release(self, user: object) -> None:
        """``user`` is done with the worker; the last one stops it and waits for it to exit."""
        self.users.discard(id(user))
        if not self.users:
            pipes = self.pipes
            self.stop()
            if pipes is not None and asyncio.get_running_loop() is self._loop:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pipes.exited), 5)

    def stop(self) -> None:
        """Stop the worker (killed: it holds nothing)."""
        self._fail("the extraction worker was stopped", failure=False)

    def timed_out(self) -> None:
        """An answer did not come in time: the worker is killed and replaced later."""
        self._fail(f"the extraction worker did not answer within {ANSWER_TIMEOUT_SECS:g} s")

    def _pause(self, why: str) -> None:
        self._backoff = min(60.0, max(1.0, 2 * self._backoff))
        self._retry_at = time.monotonic() + self._backoff
        structlog.get_logger().warning("extraction_worker_failed", error=why, retry_in_secs=self._backoff)

    def _abandon(self) -> None:
        """Forget a worker started on another event loop (which has ended): kill its process."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.pipes, self.ready, self._starting = None, False, None
        self._retry_at = self._backoff = 0.0
        self._waiting.clear()
        self.users.clear()
