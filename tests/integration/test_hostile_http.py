"""The API against hostile and clumsy clients: signatures that must cover every byte, bodies that
are too large or never finish, slowloris headers, idle and surplus connections. Honest clients
are served throughout, and the daemon's memory stays bounded."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import orjson
import psutil
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from support import Daemon, daemon_config, raw_call, stream_config, wait_for

KEY, SECRET = "AKIDHOSTILE", "hostile-test-secret"
TOKEN = "operator-token-0123456789"
LIMITS = {"max_connections": 200, "header_timeout_secs": 1, "body_timeout_secs": 2, "idle_timeout_secs": 3,
          "max_inflight_body_mib": 64, "max_unauthenticated_body_mib": 16}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("hostile")
    cfg = daemon_config(tmp, [stream_config("s", {"type": "local", "path": str(tmp / "out")})])
    cfg["api"]["auth"] = {"mode": "sigv4", "credentials": {KEY: SECRET}}
    cfg["api"]["limits"] = LIMITS
    cfg["api"]["operator_tokens"] = [TOKEN]
    d = Daemon(tmp, cfg).start()
    yield d
    d.stop()


def honest(d: Daemon) -> Any:
    return boto3.client("firehose", endpoint_url=d.endpoint, region_name="us-east-1", aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET, config=Config(retries={"max_attempts": 1}))


def signed(d: Daemon, op: str, body: bytes, *, headers: dict[str, str] | None = None,
           auth_cls: type[SigV4Auth] = SigV4Auth) -> AWSRequest:
    req = AWSRequest(method="POST", url=d.endpoint + "/", data=body, headers={
        "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": f"Firehose_20150804.{op}", **(headers or {})})
    auth_cls(Credentials(KEY, SECRET), "firehose", "us-east-1").add_auth(req)
    return req


def send(d: Daemon, req: AWSRequest, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("POST", "/", body=req.body if body is None else body, headers=dict(req.headers.items()))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (orjson.loads(data) if data else {})


def signed_head(d: Daemon, op: str, content_length: int) -> bytes:
    """A request head whose headers pass every check made before the body (a known key, the date,
    host signed): only the body's hash can fail, so the body itself is what gets read."""
    req = signed(d, op, b"{}")
    head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "content-length")
    return f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n{head}Content-Length: {content_length}\r\n\r\n".encode()


def put_body(records: list[bytes]) -> bytes:
    return orjson.dumps({"DeliveryStreamName": "s", "Records": [{"Data": base64.b64encode(r).decode()} for r in records]})


def test_a_signature_made_by_botocore_passes(daemon: Daemon) -> None:
    status, doc = send(daemon, signed(daemon, "PutRecordBatch", put_body([b"a", b"b"])))
    assert (status, doc["FailedPutCount"]) == (200, 0)


def test_a_replayed_signature_with_another_body_is_refused_even_with_the_original_payload_hash(daemon: Daemon) -> None:
    original = put_body([b"what was signed"])
    req = signed(daemon, "PutRecordBatch", original,
                 headers={"X-Amz-Content-SHA256": hashlib.sha256(original).hexdigest()})
    forged = put_body([b"what the attacker sends"])
    status, doc = send(daemon, req, forged)
    assert (status, doc["__type"]) == (400, "InvalidSignatureException"), doc
    # The same captured request, header dropped, with the forged body: still refused.
    del req.headers["X-Amz-Content-SHA256"]
    status, doc = send(daemon, req, forged)
    assert (status, doc["__type"]) == (400, "InvalidSignatureException"), doc


def test_unsigned_payload_is_refused(daemon: Daemon) -> None:
    req = signed(daemon, "PutRecordBatch", put_body([b"x"]), headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    status, doc = send(daemon, req, put_body([b"anything at all"]))
    assert (status, doc["__type"]) == (400, "InvalidSignatureException"), doc
    status, doc = send(daemon, req)  # not even with the body it was made for
    assert (status, doc["__type"]) == (400, "InvalidSignatureException"), doc


class _NoHost(SigV4Auth):
    def headers_to_sign(self, request: AWSRequest) -> Any:
        headers = super().headers_to_sign(request)
        del headers["host"]
        return headers


def test_host_must_be_signed(daemon: Daemon) -> None:
    status, doc = send(daemon, signed(daemon, "PutRecordBatch", put_body([b"x"]), auth_cls=_NoHost))
    assert (status, doc["__type"]) == (400, "InvalidSignatureException"), doc
    assert "Host" in doc["message"]


@pytest.mark.parametrize("target", ["Nope", "CreateDeliveryStream"])
def test_nothing_about_an_operation_is_answered_before_authentication(daemon: Daemon, target: str) -> None:
    status, doc = raw_call(daemon.port, target, b"{}")
    assert (status, doc["__type"]) == (403, "MissingAuthenticationTokenException")


def test_a_gzip_body_signed_over_the_bytes_sent_passes(daemon: Daemon) -> None:
    body = gzip.compress(put_body([b"zipped-1", b"zipped-2"]))
    status, doc = send(daemon, signed(daemon, "PutRecordBatch", body, headers={"Content-Encoding": "gzip"}))
    assert (status, doc["FailedPutCount"], len(doc["RequestResponses"])) == (200, 0, 2), doc


def test_a_gzip_bomb_is_refused(daemon: Daemon) -> None:
    bomb = gzip.compress(b"[" + b" " * (64 << 20) + b"]")
    status, doc = send(daemon, signed(daemon, "PutRecordBatch", bomb, headers={"Content-Encoding": "gzip"}))
    assert status == 413, doc


def _rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def test_an_oversized_body_is_answered_413_without_being_read(daemon: Daemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(signed_head(daemon, "PutRecordBatch", 100 << 20) + b"{" * 1000)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def _slowloris(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket, deadline: float) -> bool:
    """True once the server has closed the connection (a byte of header sent now and then)."""
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            s.sendall(b"X")
            if s.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


class Honest:
    """A producer putting through boto3 while the attack runs; every put must succeed."""

    def __init__(self, d: Daemon) -> None:
        self.client = honest(d)
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.put_record(DeliveryStreamName="s", Record={"Data": b"honest\n"})
                self.ok += 1
            except Exception as exc:
                self.errors.append(repr(exc))
            time.sleep(0.05)

    def __enter__(self) -> Honest:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_slowloris_idle_and_stalled_connections_are_closed_and_honest_clients_served(daemon: Daemon) -> None:
    before = _rss(daemon)
    with Honest(daemon) as producer:
        slow = _slowloris(daemon.port, 60)
        idle = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(60)]
        stalled = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            s.sendall(signed_head(daemon, "ListDeliveryStreams", 1_000_000) + b"{")
            stalled.append(s)
        deadline = time.monotonic() + 15
        assert all(_closed_by_server(s, deadline) for s in slow), "slowloris connections left open"
        for s in idle:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(1) == b"", "an idle connection left open"
        for s in stalled:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            answer = s.recv(4096)
            # 408 at the body deadline, or 503 at once: the unauthenticated bytes cap was reached
            assert answer == b"" or answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")), answer[:100]
        for s in slow + idle + stalled:
            s.close()
        ok_before = producer.ok
        wait_for(lambda: producer.ok > ok_before + 5, 15, "honest puts after the attack")
    assert producer.errors == []
    assert _rss(daemon) - before < 64 << 20


def test_surplus_connections_are_refused_with_503_and_the_daemon_recovers(daemon: Daemon) -> None:
    held = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(LIMITS["max_connections"])]
    try:
        extra = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        assert extra.recv(4096).startswith(b"HTTP/1.1 503"), "a connection over the cap was not refused"
        extra.close()
    finally:
        for s in held:
            s.close()
    wait_for(lambda: _try_put(daemon), 15, "puts once the held connections are gone")


def _try_put(d: Daemon) -> bool:
    try:
        honest(d).put_record(DeliveryStreamName="s", Record={"Data": b"after\n"})
        return True
    except Exception:
        return False


def test_unauthenticated_body_bytes_are_capped_across_connections(daemon: Daemon) -> None:
    """Stalled bodies under a known access key id but no valid signature (anyone can know a key
    id) hold at most max_unauthenticated_body_mib: past it, 503."""
    before = _rss(daemon)
    head = signed_head(daemon, "PutRecordBatch", 3 << 20)
    socks, answers = [], []
    for _ in range(12):
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        s.sendall(head + b"x" * (2 << 20))  # 2 of the declared 3 MiB, then nothing
        socks.append(s)
    try:
        for s in socks:
            s.settimeout(0.5)
            try:
                answers.append(s.recv(4096))
            except TimeoutError:
                answers.append(b"")
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        # Bytes received count against the cap (a declared length alone holds nothing):
        # 16 MiB / 2 MiB received each: at most 8 are read, the rest refused with 503.
        assert 1 <= len(refused) <= 12 - 7, [a[:20] for a in answers]
        assert _rss(daemon) - before < 64 << 20
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: _try_put(daemon), 15, "puts after the stalled bodies")


def _get(d: Daemon, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_with_auth_on_healthz_is_minimal_and_details_need_a_token_or_a_signature(daemon: Daemon) -> None:
    status, body = _get(daemon, "/healthz")
    assert status == 200 and orjson.loads(body) == {"status": "ok"}
    for path in ("/healthz?detail=1", "/metrics"):
        status, body = _get(daemon, path)
        assert status == 403 and orjson.loads(body)["__type"] == "AccessDeniedException"
        status, _ = _get(daemon, path, {"Authorization": "Bearer not-the-operator-token"})
        assert status == 403
        status, body = _get(daemon, path, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
    status, body = _get(daemon, "/healthz?detail=1", {"Authorization": f"Bearer {TOKEN}"})
    doc = orjson.loads(body)
    assert "s" in doc["streams"] and str(daemon.workdir) not in body.decode()
    req = AWSRequest(method="GET", url=daemon.endpoint + "/metrics", data=b"")
    SigV4Auth(Credentials(KEY, SECRET), "firehose", "us-east-1").add_auth(req)
    status, body = _get(daemon, "/metrics", dict(req.headers.items()))
    assert status == 200 and b"firehose_IncomingRecords_total" in body


def test_stalled_requests_that_only_declare_a_large_body_do_not_block_others(daemon: Daemon) -> None:
    """Two requests declaring 15 MiB each that send nothing hold no budget: signed requests from
    honest clients keep being served while they stall."""
    stalled = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        s.sendall(signed_head(daemon, "PutRecordBatch", 15 << 20) + b"{")
        stalled.append(s)
    try:
        for _ in range(5):
            status, doc = send(daemon, signed(daemon, "PutRecordBatch", put_body([b"through"])))
            assert (status, doc.get("FailedPutCount")) == (200, 0), doc
    finally:
        for s in stalled:
            s.close()


def test_header_bytes_that_are_not_utf8_get_a_4xx_not_a_500(daemon: Daemon) -> None:
    req = signed(daemon, "ListDeliveryStreams", b"{}", headers={"X-Custom": "caf\u00e9"})
    head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() not in ("content-length", "x-custom"))
    raw = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n{head}".encode() + b"X-Custom: caf\xff\r\n"
           b"Content-Length: 2\r\n\r\n{}")
    for request in (raw, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\xff\r\n\r\n",
                    b"GET /healthz?detail=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
            s.sendall(request)
            answer = s.recv(4096)
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")), answer[:200]
