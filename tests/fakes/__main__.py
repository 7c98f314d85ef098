"""Run one protocol server in a process of its own (benchmarks: the server gets the other core)::

    python -m fakes http_endpoint|opensearch|splunk PORT

It serves until stdin closes or SIGTERM; ``GET /__fake/stats`` tells what it received.
"""

from __future__ import annotations

import signal
import sys
import threading

from fakes.http_endpoint import HttpEndpointServer
from fakes.opensearch import OpenSearchServer
from fakes.server import ThreadedServer
from fakes.splunk import SplunkHecServer


def main(argv: list[str]) -> int:
    kind, port = argv[0], int(argv[1])
    servers: dict[str, type[ThreadedServer]] = {
        "http_endpoint": HttpEndpointServer, "opensearch": OpenSearchServer, "splunk": SplunkHecServer,
    }
    server = servers[kind](port).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
