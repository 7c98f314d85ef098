"""The control plane through boto3, as LocalStack and Terraform users drive it: create a stream
with an S3 destination through the API (the daemon finding moto's S3 through
AWS_ENDPOINT_URL_S3), wait for ACTIVE, put, read the objects back, update with the VersionId,
delete (everything acknowledged delivered first); the stream survives kill -9; YAML streams are
read-only; names cannot clash either way; unsupported shapes are refused by name."""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from botocore.exceptions import ClientError

from support import Daemon, MotoServer, daemon_config, stream_config, wait_for


def s3_records(moto: MotoServer, bucket: str, prefix: str = "") -> list[int]:
    s3 = moto.client()
    out = []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        if obj["Key"].endswith(".gz"):
            body = gzip.decompress(body)
        out += [orjson.loads(line)["n"] for line in body.splitlines() if line]
    return sorted(out)


def status(fh: Any, name: str) -> str:
    return str(fh.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]["DeliveryStreamStatus"])


def code(call: Any, **kwargs: Any) -> str:
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    return str(info.value.response["Error"]["Code"]) + ": " + str(info.value.response["Error"]["Message"])


def gone(fh: Any, name: str) -> bool:
    try:
        fh.describe_delivery_stream(DeliveryStreamName=name)
    except ClientError as exc:
        return str(exc.response["Error"]["Code"]) == "ResourceNotFoundException"
    return False


def client(daemon: Daemon) -> Any:
    """As SDK users have it: standard retries, which wait out LimitExceededException (the control
    plane's 5 calls a second)."""
    import boto3
    from botocore.config import Config

    return boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="x", config=Config(retries={"mode": "standard", "max_attempts": 10}))


def put(fh: Any, name: str, numbers: range) -> list[int]:
    fh.put_record_batch(DeliveryStreamName=name,
                        Records=[{"Data": orjson.dumps({"n": n}) + b"\n"} for n in numbers])
    return list(numbers)


def test_create_put_update_delete_through_the_api_and_kill9(tmp_path: Path, moto: MotoServer) -> None:
    s3 = moto.client()
    s3.create_bucket(Bucket="api-bucket")
    yaml_stream = stream_config("from-yaml", {"type": "local", "path": str(tmp_path / "yaml-out")})
    cfg = daemon_config(tmp_path, [yaml_stream])
    cfg["api"]["control_plane"] = True
    env = {"AWS_ENDPOINT_URL_S3": moto.endpoint}
    daemon = Daemon(tmp_path, cfg, env=env).start()
    try:
        fh = client(daemon)
        # Firehose's control-plane quota: past 5 calls a second, LimitExceededException.
        import boto3
        from botocore.config import Config

        once = boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1", aws_access_key_id="x",
                            aws_secret_access_key="x", config=Config(retries={"total_max_attempts": 1}))
        codes = [code(once.delete_delivery_stream, DeliveryStreamName="none").split(":")[0] for _ in range(8)]
        assert "LimitExceededException" in codes and "ResourceNotFoundException" in codes, codes
        time.sleep(1.5)
        arn = fh.create_delivery_stream(
            DeliveryStreamName="clicks", DeliveryStreamType="DirectPut",
            ExtendedS3DestinationConfiguration={
                "RoleARN": "arn:aws:iam::000000000000:role/firehose", "BucketARN": "arn:aws:s3:::api-bucket",
                "Prefix": "clicks/", "ErrorOutputPrefix": "errors/", "CompressionFormat": "GZIP",
                "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 60},
                "CloudWatchLoggingOptions": {"Enabled": False},
                "ProcessingConfiguration": {"Enabled": False},
            },
            Tags=[{"Key": "team", "Value": "web"}],
        )["DeliveryStreamARN"]
        assert arn == "arn:aws:firehose:us-east-1:000000000000:deliverystream/clicks"
        assert status(fh, "clicks") in ("CREATING", "ACTIVE")
        wait_for(lambda: status(fh, "clicks") == "ACTIVE", 60, "the stream to be ACTIVE")
        desc = fh.describe_delivery_stream(DeliveryStreamName="clicks")["DeliveryStreamDescription"]
        ext = desc["Destinations"][0]["ExtendedS3DestinationDescription"]
        assert ext["BucketARN"] == "arn:aws:s3:::api-bucket" and ext["Prefix"] == "clicks/"
        assert ext["CompressionFormat"] == "GZIP" and desc["VersionId"] == "1"
        assert fh.list_tags_for_delivery_stream(DeliveryStreamName="clicks")["Tags"] == [{"Key": "team", "Value": "web"}]
        assert fh.list_delivery_streams()["DeliveryStreamNames"] == ["clicks", "from-yaml"]
        acked = put(fh, "clicks", range(0, 100))

        # Names cannot clash, either way round; YAML streams are read-only here.
        assert code(fh.create_delivery_stream, DeliveryStreamName="clicks",
                    S3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::api-bucket"}
                    ).startswith("ResourceInUseException")
        assert code(fh.create_delivery_stream, DeliveryStreamName="from-yaml",
                    S3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::api-bucket"}
                    ).startswith("ResourceInUseException")
        refused = code(fh.delete_delivery_stream, DeliveryStreamName="from-yaml")
        assert refused.startswith("InvalidArgumentException") and "firehose.yaml" in refused
        # Shapes this daemon does not support are refused by name, never dropped.
        assert "ElasticsearchDestinationConfiguration" in code(
            fh.create_delivery_stream, DeliveryStreamName="es",
            ElasticsearchDestinationConfiguration={"RoleARN": "r", "IndexName": "i", "ClusterEndpoint": "https://es:9200",
                                                   "S3Configuration": {"RoleARN": "r", "BucketARN": "arn:aws:s3:::b"}})
        assert "DataFormatConversionConfiguration" in code(
            fh.create_delivery_stream, DeliveryStreamName="conv",
            ExtendedS3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::api-bucket",
                                                "DataFormatConversionConfiguration": {"Enabled": True}})
        assert "bucket" in code(fh.create_delivery_stream, DeliveryStreamName="bad",
                                S3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::Not_A_Bucket"})

        # A stale VersionId is refused; the current one moves it on and the new prefix applies.
        assert code(fh.update_destination, DeliveryStreamName="clicks", CurrentDeliveryStreamVersionId="7",
                    DestinationId="destinationId-000000000001",
                    ExtendedS3DestinationUpdate={"Prefix": "v2/"}).startswith("ConcurrentModificationException")
        fh.update_destination(DeliveryStreamName="clicks", CurrentDeliveryStreamVersionId="1",
                              DestinationId="destinationId-000000000001",
                              ExtendedS3DestinationUpdate={"Prefix": "v2/", "BufferingHints": {"SizeInMBs": 1,
                                                                                                "IntervalInSeconds": 1}})
        desc = fh.describe_delivery_stream(DeliveryStreamName="clicks")["DeliveryStreamDescription"]
        assert desc["VersionId"] == "2"
        ext = desc["Destinations"][0]["ExtendedS3DestinationDescription"]
        assert ext["Prefix"] == "v2/" and ext["CompressionFormat"] == "GZIP"  # what the update left out stays
        wait_for(lambda: s3_records(moto, "api-bucket", "clicks/") == acked, 60, "the first records under clicks/")
        later = put(fh, "clicks", range(100, 150))

        # kill -9: the API stream comes back with its VersionId; nothing acknowledged is lost.
        daemon.kill9()
        daemon = Daemon(tmp_path, cfg, env=env).start()
        fh = client(daemon)
        wait_for(lambda: status(fh, "clicks") == "ACTIVE", 60, "the stream back after kill -9")
        assert fh.describe_delivery_stream(DeliveryStreamName="clicks")["DeliveryStreamDescription"]["VersionId"] == "2"
        wait_for(lambda: s3_records(moto, "api-bucket", "v2/") == later, 60, "records put before the kill")

        # A YAML reload cannot take an API stream's name.
        daemon.write_config({**cfg, "streams": [yaml_stream, stream_config("clicks", {"type": "local",
                                                                                      "path": str(tmp_path / "x")})]})
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "config_reload_rejected" for e in daemon.events()), 60, "the rejection")
        daemon.write_config(cfg)

        # export-config prints both kinds.
        out = subprocess.run([sys.executable, "-m", "firehose", "export-config", "--config", str(daemon.config_path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        exported = yaml.safe_load(out.stdout)
        assert [s["name"] for s in exported["streams"]] == ["from-yaml", "clicks"]
        assert exported["streams"][1]["destination"]["prefix"] == "v2/"

        # Delete: DELETING, then gone; what was acknowledged is delivered first.
        last = put(fh, "clicks", range(150, 400))
        fh.delete_delivery_stream(DeliveryStreamName="clicks", AllowForceDelete=True)
        assert code(fh.put_record, DeliveryStreamName="clicks", Record={"Data": b"x"}).startswith(
            "ResourceNotFoundException")
        wait_for(lambda: gone(fh, "clicks"), 60, "the stream gone")
        assert s3_records(moto, "api-bucket", "v2/") == later + last
        assert fh.list_delivery_streams()["DeliveryStreamNames"] == ["from-yaml"]
        assert not (tmp_path / "data" / "spool" / "clicks").exists()
        # The name is free again.
        fh.create_delivery_stream(DeliveryStreamName="clicks",
                                  S3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::api-bucket"})
        wait_for(lambda: status(fh, "clicks") == "ACTIVE", 60, "the new stream")
        assert fh.describe_delivery_stream(DeliveryStreamName="clicks")["DeliveryStreamDescription"]["VersionId"] == "1"
    finally:
        assert daemon.stop() == 0


def test_the_control_plane_is_off_by_default(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, [stream_config("s", {"type": "local", "path": str(tmp_path / "out")})])
    daemon = Daemon(tmp_path, cfg).start()
    try:
        refused = code(daemon.firehose().create_delivery_stream, DeliveryStreamName="x",
                       S3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::b"})
        assert refused.startswith("InvalidArgumentException")
        assert not (tmp_path / "data" / "api-streams.yaml").exists()
    finally:
        assert daemon.stop() == 0


def test_http_endpoint_splunk_and_opensearch_streams_through_the_api(tmp_path: Path, moto: MotoServer) -> None:
    from fakes.http_endpoint import HttpEndpointServer

    moto.client().create_bucket(Bucket="backups")
    endpoint = HttpEndpointServer(access_key="collector-key").start()
    cfg = daemon_config(tmp_path, [])
    cfg["api"]["control_plane"] = True
    daemon = Daemon(tmp_path, cfg, env={"AWS_ENDPOINT_URL_S3": moto.endpoint}).start()
    try:
        fh = client(daemon)
        backup = {"RoleARN": "r", "BucketARN": "arn:aws:s3:::backups", "Prefix": "failed/"}
        fh.create_delivery_stream(DeliveryStreamName="web", HttpEndpointDestinationConfiguration={
            "EndpointConfiguration": {"Url": endpoint.endpoint + "/ingest", "Name": "collector",
                                      "AccessKey": "collector-key"},
            "RequestConfiguration": {"ContentEncoding": "GZIP",
                                     "CommonAttributes": [{"AttributeName": "env", "AttributeValue": "prod"}]},
            "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 1}, "RetryOptions": {"DurationInSeconds": 60},
            "S3BackupMode": "FailedDataOnly", "S3Configuration": backup, "RoleARN": "r"})
        wait_for(lambda: status(fh, "web") == "ACTIVE", 60, "ACTIVE")
        put(fh, "web", range(5))
        wait_for(lambda: len(endpoint.records()) == 5, 30, "delivery to the endpoint")
        assert orjson.loads(endpoint.headers[0]["X-Amz-Firehose-Common-Attributes"]) == {"commonAttributes": {"env": "prod"}}
        assert endpoint.headers[0]["Content-Encoding"] == "gzip"
        desc = fh.describe_delivery_stream(DeliveryStreamName="web")["DeliveryStreamDescription"]
        hd = desc["Destinations"][0]["HttpEndpointDestinationDescription"]
        assert hd["EndpointConfiguration"] == {"Name": "collector"}
        assert hd["S3DestinationDescription"]["BucketARN"] == "arn:aws:s3:::backups"
        fh.update_destination(DeliveryStreamName="web", CurrentDeliveryStreamVersionId=desc["VersionId"],
                              DestinationId="destinationId-000000000001",
                              HttpEndpointDestinationUpdate={"RequestConfiguration": {
                                  "ContentEncoding": "NONE",
                                  "CommonAttributes": [{"AttributeName": "env", "AttributeValue": "staging"}]}})
        put(fh, "web", range(5, 8))
        wait_for(lambda: len(endpoint.records()) == 8, 30, "delivery after the update")
        assert orjson.loads(endpoint.headers[-1]["X-Amz-Firehose-Common-Attributes"]) == {
            "commonAttributes": {"env": "staging"}}
        # An update of another kind of destination is refused by name.
        assert "ExtendedS3DestinationUpdate does not apply" in code(
            fh.update_destination, DeliveryStreamName="web", CurrentDeliveryStreamVersionId="2",
            DestinationId="destinationId-000000000001", ExtendedS3DestinationUpdate={"Prefix": "x/"})

        fh.create_delivery_stream(DeliveryStreamName="logs", SplunkDestinationConfiguration={
            "HECEndpoint": "https://splunk.example:8088", "HECEndpointType": "Event", "HECToken": "hec-token-1",
            "HECAcknowledgmentTimeoutInSeconds": 200, "S3Configuration": backup, "S3BackupMode": "FailedEventsOnly"})
        fh.create_delivery_stream(DeliveryStreamName="search", AmazonopensearchserviceDestinationConfiguration={
            "RoleARN": "r", "ClusterEndpoint": "https://search.example:9200", "IndexName": "clicks",
            "IndexRotationPeriod": "OneDay", "S3Configuration": backup})
        wait_for(lambda: status(fh, "logs") == "ACTIVE" and status(fh, "search") == "ACTIVE", 60, "both ACTIVE")
        splunk = fh.describe_delivery_stream(DeliveryStreamName="logs")["DeliveryStreamDescription"]["Destinations"][0]
        assert splunk["SplunkDestinationDescription"]["HECEndpointType"] == "Event"
        assert "hec-token-1" not in json_text(splunk)
        search = fh.describe_delivery_stream(DeliveryStreamName="search")["DeliveryStreamDescription"]["Destinations"][0]
        assert search["AmazonopensearchserviceDestinationDescription"]["IndexName"] == "clicks"
        assert "DomainARN" in code(fh.create_delivery_stream, DeliveryStreamName="domain",
                                   AmazonopensearchserviceDestinationConfiguration={
                                       "RoleARN": "r", "DomainARN": "arn:aws:es:us-east-1:1:domain/d",
                                       "IndexName": "i", "S3Configuration": backup})
    finally:
        assert daemon.stop() == 0
        endpoint.stop()


def json_text(doc: Any) -> str:
    return orjson.dumps(doc, default=str).decode()


def test_encryption_calls_are_recorded_and_described(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, [stream_config("from-yaml", {"type": "local", "path": str(tmp_path / "y")})])
    cfg["api"]["control_plane"] = True
    daemon = Daemon(tmp_path, cfg).start()
    try:
        fh = client(daemon)

        def encryption(name: str) -> dict[str, Any]:
            return dict(fh.describe_delivery_stream(DeliveryStreamName=name)["DeliveryStreamDescription"]
                        ["DeliveryStreamEncryptionConfiguration"])

        fh.create_delivery_stream(DeliveryStreamName="enc", S3DestinationConfiguration={
            "RoleARN": "r", "BucketARN": "arn:aws:s3:::api-bucket"},
            DeliveryStreamEncryptionConfigurationInput={"KeyType": "AWS_OWNED_CMK"})
        wait_for(lambda: status(fh, "enc") == "ACTIVE", 60, "ACTIVE")
        assert encryption("enc") == {"Status": "ENABLED", "KeyType": "AWS_OWNED_CMK"}
        fh.stop_delivery_stream_encryption(DeliveryStreamName="enc")
        assert encryption("enc") == {"Status": "DISABLED"}
        key = "arn:aws:kms:us-east-1:000000000000:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        fh.start_delivery_stream_encryption(DeliveryStreamName="enc", DeliveryStreamEncryptionConfigurationInput={
            "KeyType": "CUSTOMER_MANAGED_CMK", "KeyARN": key})
        assert encryption("enc") == {"Status": "ENABLED", "KeyType": "CUSTOMER_MANAGED_CMK", "KeyARN": key}
        assert code(fh.start_delivery_stream_encryption, DeliveryStreamName="from-yaml").startswith(
            "InvalidArgumentException")
        assert encryption("from-yaml") == {"Status": "DISABLED"}
        # Firehose's quota: 25 Start/Stop calls a stream in 24 hours (two made above), also
        # across a restart; the 26th is LimitExceededException and changes nothing.
        import boto3
        from botocore.config import Config

        once = boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1", aws_access_key_id="x",
                            aws_secret_access_key="x", config=Config(retries={"total_max_attempts": 1}))
        for i in range(22):
            time.sleep(0.25)  # under the control plane's 5 calls a second
            (once.stop_delivery_stream_encryption if i % 2 == 0 else once.start_delivery_stream_encryption)(
                DeliveryStreamName="enc")
        assert daemon.stop() == 0
        daemon = Daemon(tmp_path, daemon.config, env=daemon.env).start()
        once = boto3.client("firehose", endpoint_url=daemon.endpoint, region_name="us-east-1", aws_access_key_id="x",
                            aws_secret_access_key="x", config=Config(retries={"total_max_attempts": 1}))
        wait_for(lambda: status(once, "enc") == "ACTIVE", 60, "ACTIVE after the restart")
        once.start_delivery_stream_encryption(DeliveryStreamName="enc")  # the 25th
        time.sleep(0.25)
        refused = code(once.stop_delivery_stream_encryption, DeliveryStreamName="enc")
        assert refused.startswith("LimitExceededException") and "24 hours" in refused
        assert encryption("enc")["Status"] == "ENABLED"
    finally:
        assert daemon.stop() == 0


def test_a_kinesis_sourced_stream_through_the_api(tmp_path: Path, moto: MotoServer, kinesalite: Any) -> None:
    moto.client().create_bucket(Bucket="from-kds")
    kinesalite.create_stream("clicks-kds", 1)
    cfg = daemon_config(tmp_path, [])
    cfg["api"]["control_plane"] = True
    env = {"AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_ENDPOINT_URL_KINESIS": kinesalite.endpoint}
    daemon = Daemon(tmp_path, cfg, env=env).start()
    try:
        fh = client(daemon)
        fh.create_delivery_stream(
            DeliveryStreamName="from-kds", DeliveryStreamType="KinesisStreamAsSource",
            KinesisStreamSourceConfiguration={"KinesisStreamARN": "arn:aws:kinesis:us-east-1:000000000000:stream/clicks-kds",
                                              "RoleARN": "r"},
            ExtendedS3DestinationConfiguration={"RoleARN": "r", "BucketARN": "arn:aws:s3:::from-kds",
                                                "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 1}})
        wait_for(lambda: status(fh, "from-kds") == "ACTIVE", 60, "ACTIVE")
        desc = fh.describe_delivery_stream(DeliveryStreamName="from-kds")["DeliveryStreamDescription"]
        assert desc["DeliveryStreamType"] == "KinesisStreamAsSource"
        assert desc["Source"]["KinesisStreamSourceDescription"]["KinesisStreamARN"].endswith(":stream/clicks-kds")
        assert code(fh.put_record, DeliveryStreamName="from-kds", Record={"Data": b"x"}).startswith(
            "InvalidArgumentException")
        # Firehose reads from LATEST: what is put before the source took its shard iterator is not
        # read. So: put one record at a time until one arrives; from then on, every record arrives once.
        kds = kinesalite.client()
        sent = iter(range(1000))

        def first_arrived() -> bool:
            n = next(sent)
            kds.put_record(StreamName="clicks-kds", Data=orjson.dumps({"n": n}) + b"\n", PartitionKey=str(n))
            return bool(s3_records(moto, "from-kds"))

        wait_for(first_arrived, 60, "the source reading")
        later = [next(sent) for _ in range(5)]
        for n in later:
            kds.put_record(StreamName="clicks-kds", Data=orjson.dumps({"n": n}) + b"\n", PartitionKey=str(n))
        wait_for(lambda: set(later) <= set(s3_records(moto, "from-kds")), 60, "the Kinesis records in S3")
        got = s3_records(moto, "from-kds")
        assert len(got) == len(set(got)) and got == list(range(got[0], later[-1] + 1))
        fh.update_destination(DeliveryStreamName="from-kds", CurrentDeliveryStreamVersionId=desc["VersionId"],
                              DestinationId="destinationId-000000000001",
                              ExtendedS3DestinationUpdate={"Prefix": "v2/"})
        wait_for(lambda: status(fh, "from-kds") == "ACTIVE", 60, "ACTIVE after the update")
        desc = fh.describe_delivery_stream(DeliveryStreamName="from-kds")["DeliveryStreamDescription"]
        assert desc["DeliveryStreamType"] == "KinesisStreamAsSource"  # the source stays
    finally:
        assert daemon.stop() == 0


def test_a_redshift_stream_into_postgresql_through_the_api(tmp_path: Path, moto: MotoServer, postgres: Any) -> None:
    moto.client().create_bucket(Bucket="staging")
    postgres.execute("CREATE TABLE api_clicks (n bigint, page text)")
    cfg = daemon_config(tmp_path, [])
    cfg["api"]["control_plane"] = True
    # The staging bucket is reached through the config's defaults for API streams, not the environment.
    cfg["api"]["control_plane_s3"] = {"endpoint_url": moto.endpoint, "access_key_id": "x",
                                      "secret_access_key": "staging-secret"}
    daemon = Daemon(tmp_path, cfg, env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}).start()
    try:
        fh = client(daemon)
        p = postgres.params()
        fh.create_delivery_stream(DeliveryStreamName="rs", RedshiftDestinationConfiguration={
            "RoleARN": "r", "ClusterJDBCURL": f"jdbc:postgresql://{p['host']}:{p['port']}/{p['dbname']}",
            "CopyCommand": {"DataTableName": "api_clicks", "DataTableColumns": "n,page", "CopyOptions": "JSON 'auto'"},
            "Username": p["user"], "Password": p["password"], "RetryOptions": {"DurationInSeconds": 60},
            "S3Configuration": {"RoleARN": "r", "BucketARN": "arn:aws:s3:::staging", "Prefix": "stage/",
                                "BufferingHints": {"SizeInMBs": 1, "IntervalInSeconds": 1}}})
        wait_for(lambda: status(fh, "rs") == "ACTIVE", 60, "ACTIVE")
        fh.put_record_batch(DeliveryStreamName="rs", Records=[
            {"Data": orjson.dumps({"n": n, "page": f"/p{n}"})} for n in range(20)])
        wait_for(lambda: postgres.execute("SELECT count(*) FROM api_clicks")[0][0] == 20, 60, "the rows")
        assert postgres.execute("SELECT n, page FROM api_clicks ORDER BY n")[3] == (3, "/p3")
        desc = fh.describe_delivery_stream(DeliveryStreamName="rs")["DeliveryStreamDescription"]
        rd = desc["Destinations"][0]["RedshiftDestinationDescription"]
        assert rd["CopyCommand"]["DataTableName"] == "api_clicks"
        assert p["password"] not in json_text(desc)
        assert moto.client().list_objects_v2(Bucket="staging", Prefix="stage/")["KeyCount"] > 0
        stored = tmp_path / "data" / "api-streams.yaml"
        assert stored.stat().st_mode & 0o777 == 0o600  # it holds the password
        assert "staging-secret" not in stored.read_text()  # the config's defaults are applied, not stored
    finally:
        assert daemon.stop() == 0


def test_a_stream_that_cannot_start_is_described_as_creating_failed(tmp_path: Path) -> None:
    cfg = daemon_config(tmp_path, [])
    cfg["api"]["control_plane"] = True
    daemon = Daemon(tmp_path, cfg).start()
    try:
        (tmp_path / "data" / "spool").write_text("not a directory")  # no spool can be made under it
        fh = client(daemon)
        fh.create_delivery_stream(DeliveryStreamName="broken", S3DestinationConfiguration={
            "RoleARN": "r", "BucketARN": "arn:aws:s3:::broken-bucket"})
        wait_for(lambda: status(fh, "broken") == "CREATING_FAILED", 60, "CREATING_FAILED")
        desc = fh.describe_delivery_stream(DeliveryStreamName="broken")["DeliveryStreamDescription"]
        assert desc["FailureDescription"]["Type"] == "UNKNOWN_ERROR"
        fh.delete_delivery_stream(DeliveryStreamName="broken")
        wait_for(lambda: gone(fh, "broken"), 60, "the failed stream deleted")
    finally:
        assert daemon.stop() == 0
