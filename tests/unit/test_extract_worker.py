"""The extraction worker's pipe protocol, daemon side: output that is not the protocol, an
answer nobody asked for and an answer that cannot be read each fail the worker (it is killed and
started again after a pause), and never hand one request's answer to another."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from firehose.stages.extract_worker import _HEADER, _READY, SharedWorker, WorkerFailed, _Pipes


def message(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


async def connected() -> tuple[SharedWorker, _Pipes]:
    """A worker whose pipes are connected (no process behind them) and that said it is ready."""
    worker = SharedWorker()
    worker._loop = asyncio.get_running_loop()  # noqa: SLF001 - driven without a process
    pipes = _Pipes(worker)
    worker._connected(pipes)  # noqa: SLF001
    pipes.pipe_data_received(1, message(_READY))
    assert worker.ready
    return worker, pipes


def failed(worker: SharedWorker) -> bool:
    """The worker was dropped, and another is not started before a pause."""
    return worker.pipes is None and not worker.ready and worker._retry_at > time.monotonic()  # noqa: SLF001


@pytest.mark.parametrize("garbage", [b"Welcome from sitecustomize!\n" * 3, message(b"not the ready message")])
def test_output_that_is_not_the_protocol_fails_the_worker(garbage: bytes) -> None:
    async def go() -> None:
        worker = SharedWorker()
        worker._loop = asyncio.get_running_loop()  # noqa: SLF001
        pipes = _Pipes(worker)
        worker._connected(pipes)  # noqa: SLF001
        pipes.pipe_data_received(1, garbage)
        assert failed(worker)

    asyncio.run(go())


def test_an_answer_nobody_asked_for_fails_the_worker() -> None:
    async def go() -> None:
        worker, pipes = await connected()
        pipes.pipe_data_received(1, message(pickle.dumps((True, "stray"))))
        assert failed(worker)

    asyncio.run(go())


def test_an_unreadable_answer_fails_its_own_request_and_the_ones_after() -> None:
    async def go() -> None:
        worker, pipes = await connected()
        first: asyncio.Future[object] = worker._loop.create_future()  # type: ignore[union-attr]  # noqa: SLF001
        second: asyncio.Future[object] = worker._loop.create_future()  # type: ignore[union-attr]  # noqa: SLF001
        worker._waiting.extend([first, second])  # noqa: SLF001 - two requests sent
        # A pickle of a class this side does not have (a worker of another version).
        pipes.pipe_data_received(1, message(b"\x80\x05\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x0cno_such_modx"
                                            b"\x94\x8c\x03Cls\x94\x93\x94."))
        assert failed(worker)
        for fut in (first, second):
            assert isinstance(fut.exception(), WorkerFailed)
        # A later answer on the dropped pipes reaches nobody.
        pipes.pipe_data_received(1, message(pickle.dumps((True, "late"))))
        assert worker.pipes is None

    asyncio.run(go())


def test_answers_split_across_reads_go_to_their_requests_in_order() -> None:
    async def go() -> None:
        worker, pipes = await connected()
        futs = [worker._loop.create_future() for _ in range(3)]  # type: ignore[union-attr]  # noqa: SLF001
        worker._waiting.extend(futs)  # noqa: SLF001
        stream = b"".join(message(pickle.dumps((True, n))) for n in range(3))
        for i in range(0, len(stream), 7):  # arrives a few bytes at a time
            pipes.pipe_data_received(1, stream[i : i + 7])
        assert [f.result() for f in futs] == [(True, 0), (True, 1), (True, 2)]
        assert worker.pipes is pipes and worker.ready

    asyncio.run(go())
