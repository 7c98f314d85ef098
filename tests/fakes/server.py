"""A real aiohttp server on 127.0.0.1 in a thread of its own, which tests and benchmarks stop and
start again on the same port (an outage)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from support import free_port


class ThreadedServer:
    """Subclasses add routes in ``routes``; state is guarded by ``lock`` (handlers run in the
    server's thread, assertions in the test's)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """What was received, for a benchmark that runs the server in another process."""
        return {}

    async def _stats(self, request: web.Request) -> web.Response:
        with self.lock:
            return web.json_response(self.stats())

    def start(self) -> ThreadedServer:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                app = web.Application(client_max_size=256 << 20)
                app.router.add_get("/__fake/stats", self._stats)
                self.routes(app)
                self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
                loop.run_until_complete(site.start())
            except BaseException as exc:  # reported to start()'s caller
                failed.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"{type(self).__name__}-{self.port}")
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection (as a crashed server would)."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
