"""The control plane driven by the clients people already have: the AWS SDK for JavaScript v3
(npm), the AWS SDK for Go v2 (Debian's package, built offline) and the AWS CLI. Each runs create ->
wait for ACTIVE -> put -> describe -> update -> delete against a daemon with SigV4 on, and parses
ResourceInUseException, ConcurrentModificationException, LimitExceededException and
AccessDeniedException (the last one generic: it is not in Firehose's model). The records each
put reach moto's S3, found through AWS_ENDPOINT_URL_S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from support import Daemon, MotoServer, aws_cli_path, daemon_config, stream_config, unavailable, wait_for

SDK = Path(__file__).resolve().parent.parent / "sdk"
GOPATH = "/usr/share/gocode"
ADMIN, LIMITED = ("ADMINKEY", "admin-secret-1"), ("LIMITEDKEY", "limited-secret-1")
EXPECTED = {"status": "ACTIVE", "failedPutCount": "0", "stale": "ConcurrentModificationException",
            "versionAfterUpdate": "2", "duplicate": "ResourceInUseException", "denied": "AccessDeniedException",
            "limit": "LimitExceededException", "deleted": "ResourceNotFoundException"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer) -> Iterator[tuple[Daemon, MotoServer]]:
    moto.client().create_bucket(Bucket="sdk-bucket")
    tmp = tmp_path_factory.mktemp("sdk")
    cfg = daemon_config(tmp, [stream_config("from-yaml", {"type": "local", "path": str(tmp / "out")})])
    cfg["api"]["control_plane"] = True
    cfg["api"]["auth"] = {"mode": "sigv4", "credentials": {
        ADMIN[0]: ADMIN[1], LIMITED[0]: {"secret": LIMITED[1], "allow": ["firehose:Describe*"]}}}
    daemon = Daemon(tmp, cfg, env={"AWS_ENDPOINT_URL_S3": moto.endpoint}).start()
    yield daemon, moto
    assert daemon.stop() == 0


def run_cycle(command: list[str], daemon: Daemon, stream: str, cwd: Path) -> dict[str, Any]:
    env = {**os.environ, "ENDPOINT": daemon.endpoint, "AKID": ADMIN[0], "SECRET": ADMIN[1], "STREAM": stream,
           "BUCKET": "sdk-bucket", "LIMITED_AKID": LIMITED[0], "LIMITED_SECRET": LIMITED[1]}
    time.sleep(1.2)  # a fresh second of the control plane's 5 calls a second
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "_stderr": result.stderr[-2000:]}


def delivered(moto: MotoServer, stream: str) -> list[int]:
    s3 = moto.client()
    out = []
    for obj in s3.list_objects_v2(Bucket="sdk-bucket", Prefix=f"{stream}").get("Contents", []):
        out += [orjson.loads(line)["n"] for line in s3.get_object(Bucket="sdk-bucket", Key=obj["Key"])["Body"].read()
                .splitlines() if line]
    return sorted(out)


def check(seen: dict[str, Any], stream: str, moto: MotoServer) -> None:
    assert seen["arn"] == f"arn:aws:firehose:us-east-1:000000000000:deliverystream/{stream}"
    assert {k: str(seen[k]) for k in EXPECTED} == EXPECTED, seen["_stderr"]
    wait_for(lambda: delivered(moto, stream) == [0, 1, 2], 30, "the records in S3")


def test_javascript_sdk_v3(setup: tuple[Daemon, MotoServer]) -> None:
    daemon, moto = setup
    node = shutil.which("node")
    if node is None or not (SDK / "js" / "node_modules" / "@aws-sdk" / "client-firehose").is_dir():
        unavailable("node or @aws-sdk/client-firehose is not installed (scripts/test.sh runs npm ci in tests/sdk/js)")
    check(run_cycle([node, "cycle.mjs"], daemon, "js-stream", SDK / "js"), "js-stream", moto)


def test_go_sdk_v2(setup: tuple[Daemon, MotoServer], tmp_path: Path) -> None:
    daemon, moto = setup
    go = shutil.which("go")
    if go is None or not Path(GOPATH, "src/github.com/aws/aws-sdk-go-v2/service/firehose").is_dir():
        unavailable("go or Debian's golang-github-aws-aws-sdk-go-v2-dev is not installed (scripts/test.sh installs "
                    "them with apt)")
    binary = tmp_path / "cycle"
    build = subprocess.run([go, "build", "-o", str(binary), "."], cwd=SDK / "go", capture_output=True, text=True,
                           timeout=600, env={**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH,
                                             "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "-mod=mod"})
    assert build.returncode == 0, build.stderr
    check(run_cycle([str(binary)], daemon, "go-stream", tmp_path), "go-stream", moto)


def test_aws_cli(setup: tuple[Daemon, MotoServer]) -> None:
    daemon, moto = setup
    aws = aws_cli_path()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1],
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_PAGER": ""}

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([aws, "--endpoint-url", daemon.endpoint, "firehose", *args], capture_output=True,
                                text=True, env=env, timeout=120)
        assert (result.returncode == 0) == ok, result.stdout + result.stderr
        return result

    time.sleep(1.2)
    cli("create-delivery-stream", "--delivery-stream-name", "cli-stream", "--extended-s3-destination-configuration",
        json.dumps({"RoleARN": "r", "BucketARN": "arn:aws:s3:::sdk-bucket", "Prefix": "cli-stream/",
                    "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 1}}))

    def status() -> str:
        return str(json.loads(cli("describe-delivery-stream", "--delivery-stream-name", "cli-stream").stdout)
                   ["DeliveryStreamDescription"]["DeliveryStreamStatus"])

    wait_for(lambda: status() == "ACTIVE", 60, "ACTIVE")
    records = json.dumps([{"Data": json.dumps({"n": n}) + "\n"} for n in range(3)])
    cli("put-record-batch", "--delivery-stream-name", "cli-stream", "--records", records)
    stale = cli("update-destination", "--delivery-stream-name", "cli-stream", "--current-delivery-stream-version-id",
                "9", "--destination-id", "destinationId-000000000001", "--extended-s3-destination-update",
                json.dumps({"Prefix": "x/"}), ok=False)
    assert "ConcurrentModificationException" in stale.stderr
    cli("update-destination", "--delivery-stream-name", "cli-stream", "--current-delivery-stream-version-id", "1",
        "--destination-id", "destinationId-000000000001", "--extended-s3-destination-update",
        json.dumps({"Prefix": "cli-stream-v2/"}))
    time.sleep(1.2)
    cli("delete-delivery-stream", "--delivery-stream-name", "cli-stream")
    wait_for(lambda: "ResourceNotFoundException" in cli("describe-delivery-stream", "--delivery-stream-name",
                                                        "cli-stream", ok=False).stderr, 60, "the stream gone")
    assert delivered(moto, "cli-stream") == [0, 1, 2]
