"""Optional SigV4 verification: real clients (boto3, the AWS CLI) sign; wrong keys are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from firehose.auth import AuthError, verify
from support import Daemon, daemon_config, raw_call, stream_config


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("auth")
    cfg = daemon_config(tmp, [stream_config("s", {"type": "local", "path": str(tmp / "out")})])
    cfg["api"]["auth"] = {"mode": "sigv4", "credentials": {"AKIDGOOD": "${GOOD_SECRET}"}}
    d = Daemon(tmp, cfg, env={"GOOD_SECRET": "s3cr3t"}).start()
    yield d
    d.stop()


def client(d: Daemon, key: str, secret: str, region: str = "eu-west-1") -> object:
    return boto3.client("firehose", endpoint_url=d.endpoint, region_name=region, aws_access_key_id=key,
                        aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}))


def test_signed_requests_pass_in_any_region(daemon: Daemon) -> None:
    for region in ("eu-west-1", "us-east-1"):
        fh = client(daemon, "AKIDGOOD", "s3cr3t", region)
        assert fh.put_record(DeliveryStreamName="s", Record={"Data": b"x"})["RecordId"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("key", "secret", "code"), [
    ("AKIDGOOD", "wrong", "InvalidSignatureException"),
    ("AKIDNOPE", "s3cr3t", "UnrecognizedClientException"),
])
def test_bad_credentials_are_refused(daemon: Daemon, key: str, secret: str, code: str) -> None:
    with pytest.raises(ClientError) as info:
        client(daemon, key, secret).list_delivery_streams()  # type: ignore[attr-defined]
    assert info.value.response["Error"]["Code"] == code


def test_unsigned_request_is_refused(daemon: Daemon) -> None:
    status, doc = raw_call(daemon.port, "ListDeliveryStreams", b"{}")
    assert (status, doc["__type"]) == (403, "MissingAuthenticationTokenException")


def test_aws_cli_signs_and_passes(daemon: Daemon, tmp_path: Path) -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDGOOD", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "AWS_DEFAULT_REGION": "us-west-2", "AWS_PAGER": ""}
    res = subprocess.run([sys.executable, "-m", "awscli", "firehose", "list-delivery-streams", "--endpoint-url",
                          daemon.endpoint], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert '"s"' in res.stdout


def _signed() -> tuple[dict[str, str], bytes]:
    body = b'{"Limit":1}'
    req = AWSRequest("POST", "http://127.0.0.1:4573/", data=body, headers={
        "X-Amz-Target": "Firehose_20150804.ListDeliveryStreams", "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials("AKIDGOOD", "s3cr3t"), "firehose", "us-east-1").add_auth(req)
    headers = dict(req.headers.items())
    headers["Host"] = "127.0.0.1:4573"
    return headers, body


def test_clock_skew_beyond_five_minutes_is_refused() -> None:
    headers, body = _signed()
    creds = {"AKIDGOOD": "s3cr3t"}
    now = datetime.now(UTC)
    assert verify("POST", "/", "", headers, body, creds, now=now + timedelta(minutes=4)) == "AKIDGOOD"
    with pytest.raises(AuthError, match="Signature expired"):
        verify("POST", "/", "", headers, body, creds, now=now + timedelta(minutes=6))
    with pytest.raises(AuthError, match="Signature not yet current"):
        verify("POST", "/", "", headers, body, creds, now=now - timedelta(minutes=6))
    with pytest.raises(AuthError) as info:
        verify("POST", "/", "", headers, body + b" ", creds, now=now)
    assert info.value.code == "InvalidSignatureException"
