"""Access control per key (IAM-lite) through boto3 and the AWS CLI: actions and streams a key may
use, ListDeliveryStreams showing only what it may see, AccessDeniedException as AWS services
shape it (a generic error with that code to SDKs), secrets from files rotated on SIGHUP, and
config errors at their line without the secret in them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from support import Daemon, aws_cli_path, daemon_config, free_port, stream_config, validate_config, wait_for

ACCOUNT = "000000000000"


def client(daemon: Daemon, akid: str, secret: str) -> Any:
    return boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1",
                        aws_access_key_id=akid, aws_secret_access_key=secret,
                        config=Config(retries={"total_max_attempts": 1}))


def error_of(call: Any, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    return info.value.response


def denied(response: dict[str, Any], action: str, stream: str) -> None:
    assert response["Error"]["Code"] == "AccessDeniedException"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message = response["Error"]["Message"]
    assert f"is not authorized to perform: firehose:{action} on resource: " \
           f"arn:aws:firehose:us-east-1:{ACCOUNT}:deliverystream/{stream}" in message, message


def test_keys_limited_to_actions_and_streams(tmp_path: Path) -> None:
    secret_file = tmp_path / "producer.secret"
    secret_file.write_text("producer-secret-1\n")
    credentials = {
        "ADMINKEY": "admin-secret",
        "PRODUCERKEY": {"secret_file": str(secret_file), "allow": ["firehose:PutRecord*"], "streams": ["clicks-*"]},
        "READERKEY": {"secret": "reader-secret", "allow": ["firehose:Describe*", "firehose:list*"],
                      "streams": ["clicks-a"]},
        "CREATORKEY": {"secret": "creator-secret", "allow": ["firehose:CreateDeliveryStream"], "streams": ["team-*"]},
    }
    streams = [stream_config(n, {"type": "local", "path": str(tmp_path / n)}) for n in ("clicks-a", "clicks-b", "orders")]
    cfg = daemon_config(tmp_path, streams, api={"listen": f"127.0.0.1:{free_port()}", "control_plane": True,
                                                "auth": {"mode": "sigv4", "credentials": credentials}})
    daemon = Daemon(tmp_path, cfg).start()
    try:
        admin = client(daemon, "ADMINKEY", "admin-secret")
        producer = client(daemon, "PRODUCERKEY", "producer-secret-1")
        reader = client(daemon, "READERKEY", "reader-secret")

        assert admin.list_delivery_streams()["DeliveryStreamNames"] == ["clicks-a", "clicks-b", "orders"]
        producer.put_record(DeliveryStreamName="clicks-a", Record={"Data": b"a\n"})
        assert producer.put_record_batch(DeliveryStreamName="clicks-b", Records=[{"Data": b"b\n"}])["FailedPutCount"] == 0
        denied(error_of(producer.put_record, DeliveryStreamName="orders", Record={"Data": b"x"}), "PutRecord", "orders")
        denied(error_of(producer.describe_delivery_stream, DeliveryStreamName="clicks-a"),
               "DescribeDeliveryStream", "clicks-a")
        assert error_of(producer.list_delivery_streams)["Error"]["Code"] == "AccessDeniedException"
        # A name the key may use but no stream has: the usual ResourceNotFoundException. A name it may
        # not use: denied, whether or not the stream exists (nothing is learnt about it).
        missing = error_of(producer.put_record, DeliveryStreamName="clicks-zzz", Record={"Data": b"x"})
        assert missing["Error"]["Code"] == "ResourceNotFoundException"
        denied(error_of(producer.put_record, DeliveryStreamName="nope", Record={"Data": b"x"}), "PutRecord", "nope")

        assert reader.list_delivery_streams()["DeliveryStreamNames"] == ["clicks-a"]  # actions match any case
        assert reader.describe_delivery_stream(DeliveryStreamName="clicks-a")["DeliveryStreamDescription"]
        denied(error_of(reader.describe_delivery_stream, DeliveryStreamName="orders"), "DescribeDeliveryStream",
               "orders")
        denied(error_of(reader.put_record, DeliveryStreamName="clicks-a", Record={"Data": b"x"}), "PutRecord",
               "clicks-a")
        hostile = error_of(reader.describe_delivery_stream, DeliveryStreamName="a" * 64 + "\u2028")
        assert hostile["Error"]["Code"] in ("AccessDeniedException", "ValidationException")
        assert "\u2028" not in hostile["Error"]["Message"]

        # A key limited to some streams creates only what stays within S3: an HTTP endpoint, a Kinesis
        # source or a Lambda would reach wherever the daemon's own network and credentials can.
        creator = client(daemon, "CREATORKEY", "creator-secret")
        s3_dest = {"RoleARN": "r", "BucketARN": "arn:aws:s3:::team-bucket"}
        creator.create_delivery_stream(DeliveryStreamName="team-s3", S3DestinationConfiguration=s3_dest)
        web = error_of(creator.create_delivery_stream, DeliveryStreamName="team-web",
                       HttpEndpointDestinationConfiguration={"EndpointConfiguration": {"Url": "http://169.254.169.254/"},
                                                             "S3Configuration": s3_dest})
        assert web["Error"]["Code"] == "AccessDeniedException" and "stay within S3" in web["Error"]["Message"]
        denied(error_of(creator.create_delivery_stream, DeliveryStreamName="other", S3DestinationConfiguration=s3_dest),
               "CreateDeliveryStream", "other")
        # Status and metrics name every stream: only a key without limits may read them.
        assert _signed_get(daemon, "/status.json", "READERKEY", "reader-secret") == 403
        assert _signed_get(daemon, "/status.json", "ADMINKEY", "admin-secret") == 200

        # The AWS CLI surfaces the same code.
        cli = _aws_cli(daemon, "PRODUCERKEY", "producer-secret-1",
                       ["firehose", "put-record", "--delivery-stream-name", "orders",
                        "--record", '{"Data":"eA=="}'])
        assert cli.returncode != 0 and "AccessDeniedException" in cli.stderr, cli.stderr

        # The producer's secret is rotated in its file; SIGHUP applies it without a restart.
        secret_file.write_text("producer-secret-2\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "config_reloaded" for e in daemon.events()), 60, "the reload")
        old = error_of(producer.put_record, DeliveryStreamName="clicks-a", Record={"Data": b"x"})
        assert old["Error"]["Code"] == "InvalidSignatureException"
        client(daemon, "PRODUCERKEY", "producer-secret-2").put_record(DeliveryStreamName="clicks-a",
                                                                       Record={"Data": b"c\n"})
        assert not any(e.get("event") == "config_reload_restart_required" for e in daemon.events())
        assert "producer-secret" not in daemon.logs()
    finally:
        assert daemon.stop() == 0


def _signed_get(daemon: Daemon, path: str, akid: str, secret: str) -> int:
    import urllib.error
    import urllib.request

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    req = AWSRequest(method="GET", url=daemon.endpoint + path, data=b"")
    SigV4Auth(Credentials(akid, secret), "firehose", "us-east-1").add_auth(req)
    try:
        with urllib.request.urlopen(urllib.request.Request(req.url, headers=dict(req.headers)), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _aws_cli(daemon: Daemon, akid: str, secret: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    aws = aws_cli_path()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": akid, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1", "AWS_PAGER": ""}
    return subprocess.run([aws, "--endpoint-url", daemon.endpoint, *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize(("entry", "expected"), [
    ({"secret": "s3cr3t-value", "secret_file": "/nonexistent"}, "give exactly one of secret and secret_file"),
    ({"secret_file": "/nonexistent/firehose.secret"}, "cannot read secret_file /nonexistent/firehose.secret"),
    ({"secret": "s3cr3t-value", "allow": ["PutRecord"]}, "is not an action pattern"),
    ({"secret": "s3cr3t-value", "streams": ["clicks/*"]}, "is not a stream name pattern"),
])
def test_key_policy_errors_are_reported_at_their_line_without_the_secret(
        tmp_path: Path, entry: dict[str, Any], expected: str) -> None:
    cfg = daemon_config(tmp_path, [stream_config("s", {"type": "local", "path": str(tmp_path / "out")})],
                        api={"auth": {"mode": "sigv4", "credentials": {"KEY": entry}}})
    path, status, text = validate_config(tmp_path, cfg)
    assert status != 0
    assert re.search(rf"{re.escape(str(path))}:\d+: api\.auth\.credentials\.KEY", text), text
    assert expected in text, text
    assert "s3cr3t-value" not in text and "Traceback" not in text


def test_the_plain_form_still_means_everything(tmp_path: Path) -> None:
    from firehose.access import AuthConfig

    auth = AuthConfig.model_validate({"mode": "sigv4", "credentials": {"K": "secret"}})
    assert auth.secrets == {"K": "secret"} and auth.policy("K") is None
