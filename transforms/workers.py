"""Transformation handlers run in worker processes the daemon owns.

A :class:`WorkerPool` keeps ``processes`` Python processes, each of which has imported one handler
(``"package.module:function"``) once and then serves invocations one at a time, the way a warm
Lambda execution environment does. The pool gives the daemon what Lambda gives Firehose:

* isolation: a handler that hangs, leaks or crashes the interpreter costs one worker, which is
  killed (``SIGKILL``) and replaced, never the daemon;
* a timeout: an invocation still running after ``timeout_secs`` fails with ``Lambda.Timeout``;
* Lambda's error shapes: a handler exception is ``Lambda.FunctionError`` ``"<Type>: <message>"``;
  a worker that dies is ``Lambda.FunctionError`` ``"Runtime.ExitError: ..."``; a response that is
  not JSON-serialisable is ``Lambda.FunctionError`` ``"Runtime.MarshalError: ..."``.

Processes are started with ``spawn`` (or ``forkserver``), never ``fork``: the daemon runs threads
(the event loop's executors, boto3), and forking a threaded process can copy held locks into the
child. Workers are daemonic (they die with the daemon), so a handler cannot itself start
``multiprocessing`` children.

IPC is one pipe per worker, in two forms. The daemon's own invocations (:meth:`WorkerPool.invoke_records`)
send only what the event is made of: the record ids, arrival times and raw bytes (and Kinesis
metadata, when there is any), pickled. The worker builds the event Firehose would send, measures it
against the payload limit, calls the handler, serialises the result as JSON as Lambda's runtime
does (so a handler that returns something Lambda could not marshal fails here too), decodes that
JSON again and runs Firehose's response checks; what comes back is one compact tuple per input
record (``data`` left out where the function returned the bytes it was given). Base64, JSON and
validation thus cost the worker processes, not the daemon's event loop. :meth:`WorkerPool.call`
sends a whole event dict instead and gets the decoded JSON response back (the unit-test harness
and any caller with its own event use it). The daemon side waits on the pipe in a dedicated
thread per in-flight call, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn, TypeVar, cast

import structlog

from firehose.records import SourceBatch, SourceRecord
from firehose.transforms.lambda_ import (
    FUNCTION_ERROR,
    SERVICE_EXCEPTION,
    TIMEOUT,
    TIMEOUT_MESSAGE,
    LambdaInvocationError,
    PayloadOverLimit,
    Validated,
)
from firehose.transforms.worker_process import (
    CONTEXT_FIELDS,
    ERROR,
    READY,
    RECORDS,
    REJECTED,
    RESULT,
    SHUTDOWN,
    TOO_LARGE,
    VALIDATED,
    decode_response,
    load_function,
    serve,
)

__all__ = ["WorkerPool", "load_function"]

log = structlog.get_logger()

T = TypeVar("T")

class _WorkerGone(Exception):
    """The worker's pipe closed mid-invocation; ``reason`` says how the process ended."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _exit_reason(exitcode: int | None) -> str:
    # Lambda's wording for a runtime that exits during an invocation.
    if exitcode is None:
        return "Runtime exited without providing a reason"
    if exitcode < 0:
        try:
            name = (signal.strsignal(-exitcode) or f"signal {-exitcode}").lower()
        except ValueError:
            name = f"signal {-exitcode}"
        return f"Runtime exited with error: signal: {name}"
    return f"Runtime exited with error: exit status {exitcode}"


def _reply(reply: bytes) -> object:
    kind, body = reply[0], memoryview(reply)[1:]
    if kind == VALIDATED:
        return pickle.loads(body)
    if kind == RESULT:
        return decode_response(body)
    if kind == ERROR:
        raise LambdaInvocationError(FUNCTION_ERROR, bytes(body).decode("utf-8", "replace"))
    if kind == REJECTED:
        code, message = pickle.loads(body)
        raise LambdaInvocationError(code, message)
    if kind == TOO_LARGE:
        raise PayloadOverLimit(int(bytes(body)))
    raise LambdaInvocationError(SERVICE_EXCEPTION, f"unexpected message {kind:#x} from the worker")


class _Worker:
    """One worker process and the daemon's end of its pipe.

    Several threads may wait for the same process (the IPC thread after a crash, a replacement,
    close()), so waiting and releasing are serialised here; :meth:`kill` never blocks and never
    signals a process that has already been waited for (its pid may belong to someone else by then).
    """

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pid = process.pid
        self.busy = False
        self._lock = threading.Lock()
        self._exitcode: int | None = None
        self._exited = False
        self._released = False

    def roundtrip(self, event: dict[str, Any], fields: dict[str, Any]) -> object:
        """Send one invocation as an event and wait for its answer (the decoded JSON response)."""
        return self.exchange(pickle.dumps((event, fields), protocol=pickle.HIGHEST_PROTOCOL))

    def exchange(self, request: bytes | memoryview) -> object:
        """Send one request and wait for the answer. Runs in a pool thread, never on the event loop."""
        try:
            self.conn.send_bytes(request)
            reply = self.conn.recv_bytes()
        except (EOFError, OSError):
            # It has closed its pipe, so it is exiting: collect the status for the error message.
            raise _WorkerGone(_exit_reason(self.wait(2.0))) from None
        return _reply(reply)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to exit; its exit code, or None if running."""
        with self._lock:
            if not self._exited:
                self.process.join(timeout)
                self._exitcode = self.process.exitcode
                self._exited = self._exitcode is not None
            return self._exitcode

    def kill(self) -> None:
        """SIGKILL the process unless it has already been waited for. Never blocks."""
        if self._exited or self.pid is None:
            return  # and never os.kill(0, ...): that would signal the daemon's whole process group
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass  # already gone

    def reap(self, timeout: float = 5.0) -> None:
        """Make sure the process has exited (killing it after ``timeout``) and release its resources.
        Blocking; idempotent."""
        if self.wait(timeout) is None:
            self.kill()
            self.wait(timeout)
        with self._lock:
            if self._released:
                return
            self._released = True
            self.conn.close()
            if self._exited:
                self.process.close()  # release its sentinel descriptor now rather than at garbage collection


class _Job:
    """One invocation: waiting in line for a worker (``claimed``), then running in an IPC thread.

    A worker that answers healthy takes the next job in line at once, in its IPC thread
    (:meth:`WorkerPool._pass_on`): the loop is told, but the worker does not wait for a turn of
    it. ``passed_on``, ``abandoned`` and the line itself are guarded by the pool's lock."""

    __slots__ = ("abandoned", "answer", "claimed", "fields", "finished", "passed_on", "released", "roundtrip",
                 "worker")

    def __init__(self, roundtrip: Callable[[_Worker, dict[str, Any]], object], fields: dict[str, Any],
                 answer: asyncio.Future[object]) -> None:
        self.roundtrip = roundtrip
        self.fields = fields  # the context fields; ``deadline_ms`` is added as the job starts
        self.answer = answer
        # A worker or an empty slot handed over on the loop, or the worker whose IPC thread has
        # already started the job (``worker`` is set then, and only then, before it is claimed).
        self.claimed: asyncio.Future[_Worker | None] = answer.get_loop().create_future()
        self.worker: _Worker | None = None
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()  # its roundtrip returned
        self.released = False  # the worker went back to the pool as the answer was settled
        self.passed_on = False  # the worker went on to the next job in line
        self.abandoned = False  # timed out or cancelled: the worker must not be passed on


def _answer_into(pool: WorkerPool, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
    """Run ``job`` (in an IPC thread), then the jobs in line its worker takes after it, settling
    each answer on the loop with one call; nothing when the loop is gone."""
    worker = cast(_Worker, job.worker)
    while True:
        fields = dict(job.fields)
        fields["deadline_ms"] = int(time.time() * 1000 + pool.timeout_secs * 1000)
        try:
            result, error = job.roundtrip(worker, fields), None
        except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
            result, error = None, exc
        # It answered, or its handler or event failed: the worker is healthy.
        healthy = error is None or isinstance(error, LambdaInvocationError | PayloadOverLimit)
        nxt = pool._pass_on(job) if healthy else None
        job.finished.set_result(None)
        try:
            loop.call_soon_threadsafe(_settle, pool, job, result, error, healthy and nxt is None)
            if nxt is not None:
                loop.call_soon_threadsafe(_started, nxt)
        except RuntimeError:  # the loop is closed: nobody is waiting
            return
        if nxt is None:
            return
        job = nxt


def _started(job: _Job) -> None:
    if not job.claimed.done():
        job.claimed.set_result(job.worker)


def _settle(pool: WorkerPool, job: _Job, result: object, error: BaseException | None, release: bool) -> None:
    """On the loop: the answer, and a healthy worker nobody took from its thread back in the pool
    at once, before the awaiting invocation resumes: the next call is not kept waiting for that
    turn of the loop. A worker whose call was abandoned (timed out or cancelled before this)
    is the call's to dispose of."""
    if release and not job.abandoned:
        pool._release(job)
    if job.answer.done():
        return
    if error is not None:
        job.answer.set_exception(error)
    else:
        job.answer.set_result(result)


class WorkerPool:
    """``processes`` worker processes serving one handler, with Lambda's timeout and error semantics.

    ``function`` is ``"package.module:function"`` (see :func:`load_function`), importable from the
    daemon's ``sys.path`` plus the working directory. The handler is called as
    ``handler(event, context)`` with a :class:`~firehose.transforms.lambda_.LambdaContext`.

    Contract:

    * :meth:`start` starts every worker and waits until each has imported the handler; it raises
      :class:`ValueError` naming the function and the import error (the pool is then unusable).
      :meth:`call` starts the pool itself when needed.
    * :meth:`call` runs at most ``processes`` invocations at once; further calls wait (FIFO) for a
      free worker, and the time spent waiting does not count against ``timeout_secs``.
    * :meth:`close` stops all workers within a few seconds; later calls raise
      ``Lambda.ServiceException``.

    ``nice`` > 0 lowers the workers' CPU priority by that much (``os.nice``): transformation is
    throughput work, and on a machine short of cores the daemon's acknowledgements should not wait
    behind it.

    Must be used from a single event loop.
    """

    def __init__(
        self,
        function: str,
        processes: int = 1,
        timeout_secs: float = 60.0,
        *,
        start_method: str = "spawn",
        start_timeout_secs: float = 60.0,
        nice: int = 0,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        if timeout_secs <= 0:
            raise ValueError("timeout_secs must be > 0")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                "start_method must be 'spawn' or 'forkserver' (fork is unsafe in a threaded daemon)"
            )
        self.function = function
        self.processes = processes
        self.timeout_secs = timeout_secs
        self.start_timeout_secs = start_timeout_secs
        self.nice = nice
        # Both contexts offer the same Process/Pipe API; typed as the spawn one.
        self._mp = cast(SpawnContext, multiprocessing.get_context(start_method))
        # A slot holds a ready worker, or None when its worker must be (re)started on next use.
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._line: collections.deque[_Job] = collections.deque()  # calls waiting for a slot, in order
        self._line_lock = threading.Lock()  # the line, and a job's passed_on/abandoned
        self._workers: set[_Worker] = set()  # every live process, for close()
        self._workers_lock = threading.Lock()  # spawn threads add to _workers
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        # One thread per in-flight call: each blocks on its worker's pipe.
        self._executor = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="transform-ipc")
        self._spawned = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        """Start one worker and wait for it to import the handler. Blocking; runs in a thread."""
        if self._closed:
            raise ValueError("the worker pool is closed")
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        with self._workers_lock:
            self._spawned += 1
            number = self._spawned
        process = self._mp.Process(
            target=serve, args=(self.function, child_conn, self.nice), name=f"firehose-transform-{number}", daemon=True
        )
        process.start()
        # Only the child may hold its end open: its exit must show here as EOF.
        child_conn.close()
        worker = _Worker(process, parent_conn)
        with self._workers_lock:
            # close() snapshots _workers under this lock: a worker started after that is stopped here.
            closed = self._closed
            if not closed:
                self._workers.add(worker)
        if closed:
            worker.kill()
            worker.reap(2.0)
            raise ValueError("the worker pool is closed")
        try:
            if not parent_conn.poll(self.start_timeout_secs):
                raise ValueError(
                    f"cannot load transformation function {self.function!r}: "
                    f"the worker did not start within {self.start_timeout_secs:g} s"
                )
            try:
                reply = parent_conn.recv_bytes()
            except (EOFError, OSError):
                raise ValueError(
                    f"cannot load transformation function {self.function!r}: {_exit_reason(worker.wait(2.0))}"
                ) from None
            if reply[0] != READY:
                detail = reply[1:].decode("utf-8", "replace")
                raise ValueError(f"cannot load transformation function {self.function!r}: {detail}")
        except BaseException:
            self._forget(worker)
            worker.reap(2.0)
            raise
        return worker

    def _forget(self, worker: _Worker) -> None:
        with self._workers_lock:
            self._workers.discard(worker)

    async def start(self) -> None:
        """Start every worker (concurrently) and wait until each has imported the handler.

        Raises :class:`ValueError` (``"cannot load transformation function '<spec>': <Type>: <message>"``)
        when the handler cannot be imported; no worker is left running then. Idempotent.
        """
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise ValueError("the worker pool is closed")
            results = await asyncio.gather(
                *(asyncio.to_thread(self._spawn) for _ in range(self.processes)), return_exceptions=True
            )
            workers = [r for r in results if isinstance(r, _Worker)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                for worker in workers:
                    self._forget(worker)
                    worker.kill()
                await asyncio.gather(*(asyncio.to_thread(w.reap, 2.0) for w in workers))
                raise errors[0]
            for worker in workers:
                self._give(worker)
            self._started = True
            log.info("transform_workers_started", function=self.function, processes=self.processes)

    async def close(self, grace_secs: float = 2.0) -> None:
        """Stop all workers: idle ones exit cleanly, busy ones are killed; whatever has not exited
        after ``grace_secs`` is killed. Calls in flight or waiting fail with ``Lambda.ServiceException``.
        Idempotent."""
        with self._workers_lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            self._workers.clear()
        for worker in workers:
            if worker.busy:
                worker.kill()
            else:
                try:
                    worker.conn.send_bytes(SHUTDOWN)
                except OSError:
                    worker.kill()
        # Wake every call waiting for a slot: each sees the pool closed and passes the wake-up on.
        self._give(None)

        def stop_all() -> None:
            deadline = time.monotonic() + grace_secs
            for worker in workers:
                worker.wait(max(0.0, deadline - time.monotonic()))
            for worker in workers:
                worker.kill()  # a no-op for those that exited
            for worker in workers:
                worker.reap(2.0)

        await asyncio.to_thread(stop_all)
        if self._tasks:
            # Replacements see the pool closed and stop what they started; their threads return
            # promptly because every worker they could be waiting on has been killed.
            await asyncio.wait(set(self._tasks), timeout=grace_secs)
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("transform_workers_stopped", function=self.function)

    # -- invocations ---------------------------------------------------------------------------

    async def call(self, event: dict[str, Any], context_fields: dict[str, Any]) -> object:
        """Run the handler on ``event`` in a free worker and return its response (decoded JSON).

        ``context_fields`` are :class:`~firehose.transforms.lambda_.LambdaContext` constructor arguments;
        ``deadline_ms`` is set here, when the invocation is dispatched (now + ``timeout_secs``).
        Raises :class:`~firehose.transforms.lambda_.LambdaInvocationError`:

        * ``Lambda.FunctionError`` ``"<ExcType>: <message>"`` when the handler raises;
          ``"Runtime.MarshalError: ..."`` when its result is not JSON-serialisable;
          ``"Runtime.ExitError: Runtime exited with error: ..."`` when the worker dies (it is
          replaced); ``"Runtime.ImportModuleError: ..."`` when a replacement worker cannot load the
          handler;
        * ``Lambda.Timeout`` when no answer came within ``timeout_secs`` (the worker is killed with
          SIGKILL and replaced);
        * ``Lambda.JsonProcessingException`` when the result is JSON Firehose cannot read (NaN);
        * ``Lambda.ServiceException`` when the pool is closed.
        """
        return await self._dispatch(lambda worker, fields: worker.roundtrip(event, fields), context_fields)

    async def invoke_records(
        self,
        records: Sequence[SourceRecord],
        *,
        invocation_id: str,
        stream_arn: str,
        region: str,
        source_kinesis_stream_arn: str | None,
        max_payload_bytes: int,
        context_fields: dict[str, Any],
        finish: Callable[[list[Validated]], T],
    ) -> T:
        """One invocation whose event the worker builds from ``records`` (as
        :func:`~firehose.transforms.lambda_.build_event` does) and whose response the worker decodes
        and validates (:func:`~firehose.transforms.lambda_.validate_response`), so that neither costs
        the daemon's event loop: only the record bytes cross the pipe, and the validated outcomes
        come back. Raises :class:`PayloadOverLimit` when the event's JSON would exceed
        ``max_payload_bytes`` (the handler is not called), and otherwise what :meth:`call` raises,
        plus the response checks' :class:`~firehose.transforms.lambda_.LambdaInvocationError`.

        Returns ``finish(validated)``, called in the IPC thread: turning a thousand validated
        records into outcomes there keeps that stretch of work off the event loop."""
        def roundtrip(worker: _Worker, fields: dict[str, Any]) -> object:
            # Pickled here, in the IPC thread, not on the event loop; the context fields (the
            # deadline is set at dispatch) follow as a second pickle.
            if isinstance(records, SourceBatch):  # its columns as they are
                ids, arrivals, datas, kinesis = records.record_ids, records.arrivals, records.datas, records.kinesis
            else:
                ids, arrivals = [r.record_id for r in records], [r.arrival_ms for r in records]
                datas, kinesis = [r.data for r in records], [r.kinesis for r in records]
            request = io.BytesIO()
            request.write(bytes([RECORDS]))
            pickle.dump(((invocation_id, stream_arn, region, source_kinesis_stream_arn), ids, arrivals, datas,
                         kinesis if kinesis is not None and any(k is not None for k in kinesis) else None,
                         max_payload_bytes),
                        request, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.dump(fields, request, protocol=pickle.HIGHEST_PROTOCOL)
            return finish(cast(list[Validated], worker.exchange(request.getbuffer())))

        return cast(T, await self._dispatch(roundtrip, context_fields))

    async def _dispatch(self, roundtrip: Callable[[_Worker, dict[str, Any]], object],
                        context_fields: dict[str, Any]) -> object:
        if not self._started:
            try:
                await self.start()
            except ValueError as exc:
                raise LambdaInvocationError(FUNCTION_ERROR, f"Runtime.ImportModuleError: {exc}") from None
        loop = asyncio.get_running_loop()
        job = _Job(roundtrip, {k: v for k, v in context_fields.items() if k in CONTEXT_FIELDS}, loop.create_future())
        slot = await self._claim(job)
        running = job.worker is not None  # started by a worker's IPC thread (busy from the call before)
        if not running:
            if self._closed:
                self._give(slot)  # the wake-up goes on to the next call in line
                raise LambdaInvocationError(SERVICE_EXCEPTION, f"the worker pool for {self.function} is closed")
            if slot is None:
                slot = await self._start_in_slot()
            job.worker = slot
            slot.busy = True
        worker = cast(_Worker, job.worker)
        try:
            if not running:
                self._executor.submit(_answer_into, self, loop, job)
            # The IPC thread settles the answer with one call into the loop, so the invocation
            # resumes two loop passes after its reply is in (run_in_executor's chained futures and
            # asyncio.wait take four, each as long as the requests the loop is serving).
            timer = asyncio.timeout(self.timeout_secs)
            try:
                async with timer:
                    # Shielded: a timeout leaves the answer to come, for a worker that answered
                    # just as the timeout fell (its thread may have passed it on already).
                    await asyncio.shield(job.answer)
            except BaseException:
                if timer.expired():
                    if not self._keeps_worker(job):
                        job.answer.cancel()  # a late answer is dropped
                        await self._timed_out(worker, job.finished)
                    await job.answer  # it answered in time: the answer is one loop call away
                elif not job.answer.done():
                    job.answer.cancel()
                    raise  # the invocation itself was cancelled
                # else the roundtrip's own exception, raised below by answer.result()
            try:
                result = job.answer.result()
            except _WorkerGone as gone:
                if self._closed:
                    raise LambdaInvocationError(
                        SERVICE_EXCEPTION, "the worker pool was closed during the invocation"
                    ) from None
                log.warning(
                    "transform_worker_died", function=self.function, pid=worker.pid, reason=gone.reason
                )
                raise LambdaInvocationError(FUNCTION_ERROR, f"Runtime.ExitError: {gone.reason}") from None
            return result
        finally:
            # A worker that answered, or whose handler or event failed, is back in the pool or on
            # the next call in line already. Any other (timed out, gone, or abandoned
            # mid-invocation by a cancellation) is killed: its answer would otherwise arrive for
            # the next caller.
            if not self._keeps_worker(job):
                worker.busy = False
                self._discard(worker)

    async def _claim(self, job: _Job) -> _Worker | None:
        """A free slot for ``job`` (FIFO): at once when one is idle, else when a worker passes
        itself on (the job is then running already: ``job.worker`` is set) or a slot is given
        back on the loop."""
        if not self._idle.empty():
            return self._idle.get_nowait()
        with self._line_lock:
            self._line.append(job)
        try:
            return await job.claimed
        except asyncio.CancelledError:
            with self._line_lock:
                waiting = job in self._line
                if waiting:
                    self._line.remove(job)
            if not waiting:
                if job.worker is not None:  # started by a worker's thread
                    job.answer.cancel()  # a late answer is dropped
                    if not self._keeps_worker(job):  # abandoned mid-invocation (else it answered and
                        self._discard(job.worker)  # went back to the pool, or on to the next call)
                elif job.claimed.done() and not job.claimed.cancelled():
                    self._give(job.claimed.result())  # handed a slot it will not use
            raise

    def _keeps_worker(self, job: _Job) -> bool:
        """Whether the worker answered for ``job`` (back in the pool, or on the next job); marks
        the job abandoned, so a worker still running it is not passed on."""
        with self._line_lock:
            job.abandoned = True
            return job.released or job.passed_on

    def _pass_on(self, job: _Job) -> _Job | None:
        """(IPC thread) The next call in line, now running on ``job``'s worker; None when there
        is none, or ``job`` was abandoned (its worker is being killed) or the pool closed."""
        with self._line_lock:
            if job.abandoned or self._closed:
                return None
            while self._line:
                nxt = self._line.popleft()
                if nxt.claimed.cancelled():  # its caller is leaving the line
                    continue
                nxt.worker = job.worker
                job.passed_on = True
                return nxt
            return None

    def _release(self, job: _Job) -> None:
        """(On the loop, from _settle: the worker answered.)"""
        job.released = True
        worker = cast(_Worker, job.worker)
        worker.busy = False
        if self._closed:
            self._discard(worker)
        else:
            self._give(worker)

    def _give(self, slot: _Worker | None) -> None:
        """A slot back to the pool: to the first call in line, or idle."""
        while True:
            with self._line_lock:
                job = self._line.popleft() if self._line else None
            if job is None:
                self._idle.put_nowait(slot)
                return
            if not job.claimed.done():  # (cancelled: its caller is leaving the line)
                job.claimed.set_result(slot)
                return

    async def _timed_out(self, worker: _Worker, finished: concurrent.futures.Future[None]) -> NoReturn:
        # Nobody reads the answer (the pipe breaks when the worker dies).
        worker.kill()
        # The kill closes the pipe, so the IPC thread returns at once; wait for it to free it.
        await asyncio.wait({asyncio.wrap_future(finished)}, timeout=5.0)
        log.warning("transform_invocation_timed_out", function=self.function, pid=worker.pid)
        raise LambdaInvocationError(TIMEOUT, TIMEOUT_MESSAGE) from None

    async def _start_in_slot(self) -> _Worker:
        """Start a worker for an empty slot the caller holds; on failure the slot is handed back empty."""
        spawn = asyncio.ensure_future(asyncio.to_thread(self._spawn))

        def settle(task: asyncio.Future[_Worker]) -> None:
            # The caller was cancelled while the worker started: the slot must not be lost with it.
            if task.cancelled() or task.exception() is not None:
                self._give(None)
            elif self._closed:
                self._discard(task.result())
            else:
                self._give(task.result())

        try:
            return await asyncio.shield(spawn)
        except asyncio.CancelledError:
            spawn.add_done_callback(settle)
            raise
        except ValueError as exc:
            self._give(None)
            raise LambdaInvocationError(FUNCTION_ERROR, f"Runtime.ImportModuleError: {exc}") from None
        except BaseException:
            self._give(None)
            raise

    def _discard(self, worker: _Worker) -> None:
        """Kill ``worker`` and, in the background, replace it in its slot."""
        worker.kill()
        self._forget(worker)
        task = asyncio.get_running_loop().create_task(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, old: _Worker) -> None:
        await asyncio.to_thread(old.reap, 2.0)
        if self._closed:
            return
        try:
            new = await asyncio.to_thread(self._spawn)
        except ValueError as exc:
            # Leave an empty slot: the next call retries the start and reports the error.
            log.error("transform_worker_restart_failed", function=self.function, error=str(exc))
            self._give(None)
            return
        if self._closed:
            self._forget(new)
            new.kill()
            await asyncio.to_thread(new.reap, 2.0)
            return
        self._give(new)
