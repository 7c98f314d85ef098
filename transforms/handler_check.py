"""Checking local Lambda handlers before anything runs them (``firehose validate``, ``run`` and a
reload): every handler is imported in a child process started as a transformation worker is, with
a timeout per import, because handlers are user code."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, cast

#: How long one handler's import may take in :func:`check_local_handlers`.
HANDLER_IMPORT_TIMEOUT_SECS: Final = 30.0
# A fresh interpreter importing firehose on a loaded machine; the worker pool allows as much.
_PROBE_START_SECS: Final = 60.0


def check_local_handlers(
    specs: Sequence[str], *, timeout_secs: float = HANDLER_IMPORT_TIMEOUT_SECS, start_method: str = "spawn"
) -> dict[str, str]:
    """Import every local handler (``"module:attr"``) the way a transformation worker does, and
    return ``{spec: problem}`` for each that would not start (none: every one loads).

    Handlers are user code, so they are imported in one child process, never here: started like
    the workers (``spawn``: this process's ``sys.path``, then the working directory appended; see
    :func:`firehose.transforms.worker_process.load_function`), with its output discarded. Each import
    gets ``timeout_secs``; one that hangs is killed and reported, one that ends the process is
    reported with its exit status, and the handlers after it are checked in a new child. A
    problem reads ``handler 'm:f' does not load: ModuleNotFoundError: No module named 'm'``.
    Blocking: call it from a thread when an event loop runs.
    """
    problems: dict[str, str] = {}
    todo = list(dict.fromkeys(specs))
    while todo:
        todo = _probe(todo, timeout_secs, start_method, problems)
    return problems


def _probe(specs: list[str], timeout_secs: float, start_method: str, problems: dict[str, str]) -> list[str]:
    """One child over ``specs``; returns the specs it did not reach (after a hang or a crash)."""
    import multiprocessing
    from multiprocessing.context import SpawnContext

    mp = cast(SpawnContext, multiprocessing.get_context(start_method))  # forkserver offers the same API
    parent, child = mp.Pipe(duplex=False)
    proc = mp.Process(target=_probe_main, args=(specs, child), name="firehose-handler-check", daemon=True)
    proc.start()
    child.close()  # only the child may hold its end: its exit must show here as EOF
    current: int | None = None  # the handler being imported
    deadline = time.monotonic() + max(timeout_secs, _PROBE_START_SECS)
    try:
        while True:
            if not parent.poll(max(0.0, deadline - time.monotonic())):
                if current is None:
                    for spec in specs:
                        problems[spec] = (f"handler {spec!r} was not checked: the checking process did not "
                                          f"start within {_PROBE_START_SECS:g} s")
                    return []
                problems[specs[current]] = (f"handler {specs[current]!r} did not finish importing within "
                                            f"{timeout_secs:g} s (the import was killed)")
                return specs[current + 1 :]
            try:
                kind, index, detail = parent.recv()
            except (EOFError, OSError):
                proc.join(5.0)
                reason = _exit_status(proc.exitcode)
                if current is None:
                    for spec in specs:
                        problems[spec] = f"handler {spec!r} was not checked: the checking process ended ({reason})"
                    return []
                problems[specs[current]] = f"importing handler {specs[current]!r} ended the process ({reason})"
                return specs[current + 1 :]
            if kind == "start":
                current = index
                deadline = time.monotonic() + timeout_secs
            elif kind == "failed":
                problems[specs[index]] = f"handler {specs[index]!r} does not load: {detail}"
                current = None
            elif kind == "loaded":
                current = None
            else:  # "done"
                return []
    finally:
        # A module may leave non-daemon threads behind, which would keep the child from exiting.
        proc.join(2.0 if current is None else 0.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        parent.close()


def _exit_status(code: int | None) -> str:
    import signal

    if code is None:
        return "it did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _probe_main(specs: list[str], conn: Any) -> None:
    """The checking child: import each handler as a worker would and report how it went."""
    import os
    import signal

    from firehose.transforms.worker_process import add_working_directory, describe_exception, load_function

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a worker: Ctrl-C is for the parent
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # what modules print at import is not the checker's output
    os.dup2(devnull, 2)
    add_working_directory()  # the workers' rule, so a handler imports here exactly as it will there
    for i, spec in enumerate(specs):
        conn.send(("start", i, ""))
        try:
            load_function(spec)
        except BaseException as exc:  # SyntaxError, SystemExit in module code...: all are load failures
            conn.send(("failed", i, describe_exception(exc)))
        else:
            conn.send(("loaded", i, ""))
    conn.send(("done", -1, ""))
