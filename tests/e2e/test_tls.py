"""HTTPS on the API and the firehose_http source: boto3 with ``verify=`` a CA made here, a refused
handshake with another CA, a renewed certificate taken on SIGHUP without a restart, a broken one
refused (the old one stays), and config errors at their line."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import boto3
import orjson
import pytest
from botocore.config import Config
from botocore.exceptions import SSLError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support import Daemon, daemon_config, free_port, local_objects, stream_config, validate_config, wait_for


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    """A throwaway certificate authority."""

    def __init__(self, cn: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, cert_path: Path, key_path: Path) -> int:
        """A server certificate for 127.0.0.1 and localhost, written as PEM; returns its serial."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder().subject_name(_name("firehose test")).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return serial


def served_serial(port: int, cafile: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def client(port: int, verify: Path) -> object:
    return boto3.client("firehose", endpoint_url=f"https://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x", verify=str(verify),
                        config=Config(retries={"total_max_attempts": 1}))


def test_https_api_and_source_with_a_certificate_renewed_on_sighup(tmp_path: Path) -> None:
    ca, other = Ca("firehose test CA"), Ca("another CA")
    ca_pem, other_pem = ca.pem(tmp_path / "ca.pem"), other.pem(tmp_path / "other.pem")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first = ca.issue(cert, key)
    out = tmp_path / "out"
    source_port = free_port()
    tls = {"cert": str(cert), "key": str(key)}
    s = stream_config("s", {"type": "local", "path": str(out)},
                      sources=[{"type": "firehose_http", "listen": f"127.0.0.1:{source_port}", "tls": tls}])
    cfg = daemon_config(tmp_path, [s])
    cfg["api"]["tls"] = tls
    daemon = Daemon(tmp_path, cfg)
    daemon.start(wait=False)
    try:
        wait_for(lambda: _handshakes(daemon.port, ca_pem), 60, "the API answering over TLS")
        fh = client(daemon.port, ca_pem)
        fh.put_record(DeliveryStreamName="s", Record={"Data": b'{"n": 1}\n'})  # type: ignore[attr-defined]
        desc = fh.describe_delivery_stream(DeliveryStreamName="s")  # type: ignore[attr-defined]
        assert desc["DeliveryStreamDescription"]["DeliveryStreamStatus"] == "ACTIVE"
        with pytest.raises(SSLError):
            client(daemon.port, other_pem).list_delivery_streams()  # type: ignore[attr-defined]
        # Plain HTTP to the HTTPS port gets no API answer.
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
        conn.close()

        # `firehose status` finds https in the config and trusts the CA it is given.
        status_run = subprocess.run([sys.executable, "-m", "firehose", "status", "--json", "--config",
                                     str(daemon.config_path), "--ca-bundle", str(ca_pem)],
                                    capture_output=True, text=True, timeout=60)
        assert status_run.returncode == 0, status_run.stderr
        assert "s" in orjson.loads(status_run.stdout)["streams"]
        refused_run = subprocess.run([sys.executable, "-m", "firehose", "status", "--json", "--config",
                                      str(daemon.config_path), "--ca-bundle", str(other_pem)],
                                     capture_output=True, text=True, timeout=60)
        assert refused_run.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused_run.stderr
        assert "Traceback" not in refused_run.stderr

        # The firehose_http source over TLS.
        status = _http_delivery(source_port, ca_pem, [b'{"n": 2}\n'])
        assert status == 200

        # Renewed in place: SIGHUP, and new handshakes get the new certificate.
        assert served_serial(daemon.port, ca_pem) == first and served_serial(source_port, ca_pem) == first
        second = ca.issue(cert, key)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: served_serial(daemon.port, ca_pem) == second, 60, "the renewed certificate on the API")
        assert served_serial(source_port, ca_pem) == second
        fh.put_record(DeliveryStreamName="s", Record={"Data": b'{"n": 3}\n'})  # type: ignore[attr-defined]

        # A broken key file: the reload is refused and the certificate in use stays.
        key.write_text("not a key\n")
        rejected = len([e for e in daemon.events() if e.get("event") == "config_reload_rejected"])
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: len([e for e in daemon.events() if e.get("event") == "config_reload_rejected"]) > rejected,
                 60, "the rejected reload")
        assert served_serial(daemon.port, ca_pem) == second
        fh.put_record(DeliveryStreamName="s", Record={"Data": b'{"n": 4}\n'})  # type: ignore[attr-defined]

        wait_for(lambda: sorted(orjson.loads(line)["n"] for data in local_objects(out).values()
                                for line in data.splitlines()) == [1, 2, 3, 4], 60, "every record")
    finally:
        assert daemon.stop() == 0


def _handshakes(port: int, cafile: Path) -> bool:
    try:
        served_serial(port, cafile)
        return True
    except OSError:
        return False


def _http_delivery(port: int, cafile: Path, records: list[bytes]) -> int:
    import base64
    import uuid

    ctx = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=ctx)
    rid = str(uuid.uuid4())
    body = orjson.dumps({"requestId": rid, "timestamp": 1, "records": [{"data": base64.b64encode(r).decode()}
                                                                          for r in records]})
    conn.request("POST", "/", body=body, headers={"Content-Type": "application/json",
                                                  "X-Amz-Firehose-Protocol-Version": "1.0",
                                                  "X-Amz-Firehose-Request-Id": rid})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.parametrize("problem", ["missing", "garbage", "mismatch"])
def test_certificate_problems_are_reported_at_their_line(tmp_path: Path, problem: str) -> None:
    ca = Ca("ca")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    ca.issue(cert, key)
    if problem == "missing":
        key = tmp_path / "nope.key"
    elif problem == "garbage":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    else:
        ca.issue(tmp_path / "other.pem", tmp_path / "other.key")
        key = tmp_path / "other.key"
    cfg = daemon_config(tmp_path, [stream_config("s", {"type": "local", "path": str(tmp_path / "out")})])
    cfg["api"]["tls"] = {"cert": str(cert), "key": str(key)}
    path, status, text = validate_config(tmp_path, cfg)
    assert status != 0
    assert re.search(rf"{re.escape(str(path))}:\d+: api\.tls: ", text), text
    assert ("no such file" in text) if problem == "missing" else ("do not load as a PEM pair" in text), text
    assert "Traceback" not in text
