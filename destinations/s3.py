"""Amazon S3 (or any S3-compatible server) destination.

Guarantee: exactly-once objects. The object key (random part included) is sealed in the spool
before the first upload, so a retry or a replay after a crash overwrites the same object.
Objects above ``multipart_threshold_mib`` go up as multipart uploads. Every S3 error is retried
(Firehose retries S3 failures for as long as it keeps the data; we keep it until delivered), so
``deliver`` reports failures as retryable with Firehose's ``S3.<Code>`` error codes.
"""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from firehose.destinations.objectstore import ObjectStoreConfig, ObjectStoreDestination
from firehose.interfaces import BuildContext

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Each call of the start-up check (HeadBucket, and one GET to name a 403's cause) waits this long
# at most to connect and to read; it never retries.
PREFLIGHT_CALL_TIMEOUT_SECS = 5


class S3DestinationConfig(ObjectStoreConfig):
    """Amazon S3, or any S3-compatible server: each batch is one object, named as Firehose names
    it (Firehose: ExtendedS3DestinationConfiguration)."""

    type: Literal["s3"] = Field(description="`s3`.")
    bucket: str = Field(
        description="The bucket: its name or `arn:aws:s3:::<name>` (Firehose: BucketARN).",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="An S3-compatible server's URL (MinIO, Ceph, ...); unset: AWS's endpoint for `region`.",
    )
    region: str = Field(default="us-east-1", description="The bucket's region.")
    access_key_id: str | None = Field(
        default=None,
        description="The access key id; unset: boto3's usual credential chain (environment, profile, "
        "instance role).",
    )
    secret_access_key: str | None = Field(
        default=None,
        description="The secret access key (write it as `${ENV}`).",
    )
    multipart_threshold_mib: int = Field(
        default=16, ge=5, le=1024,
        description="MiB from which an object is uploaded as a multipart upload.",
    )
    connect_timeout_secs: int = Field(
        default=5, ge=1, le=300,
        description="Seconds to connect to S3 before the attempt fails (and is retried).",
    )
    read_timeout_secs: int = Field(
        default=60, ge=1, le=3600,
        description="Seconds to wait for S3's answer before the attempt fails (and is retried).",
    )

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        name = v[len("arn:aws:s3:::") :] if v.startswith("arn:aws:s3:::") else v
        if not _BUCKET_RE.fullmatch(name):
            raise ValueError(f"must be an S3 bucket name or arn:aws:s3:::<name>, got {v!r}")
        return name

    def describe(self, buffering: Any, account_id: str) -> dict[str, Any]:
        return self.describe_destination(f"arn:aws:s3:::{self.bucket}", buffering, account_id)

    def build(self, ctx: BuildContext) -> S3Destination:
        return S3Destination(self, ctx)


class S3Destination(ObjectStoreDestination):
    config: S3DestinationConfig

    def __init__(self, config: S3DestinationConfig, ctx: BuildContext) -> None:
        super().__init__(config, ctx)
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # The delivery runner owns retries; botocore's own would hide outages from it.
            cfg = Config(
                connect_timeout=self.config.connect_timeout_secs,
                read_timeout=self.config.read_timeout_secs,
                retries={"max_attempts": 1, "mode": "standard"},
                max_pool_connections=16,
            )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.config.endpoint_url,
                region_name=self.config.region,
                aws_access_key_id=self.config.access_key_id,
                aws_secret_access_key=self.config.secret_access_key,
                config=cfg,
            )
        return self._client

    def _classify(self, exc: Exception) -> tuple[str, str]:
        return _classify(exc)

    async def preflight(self) -> str | None:
        """HeadBucket with the destination's credentials: the bucket exists, is in the configured
        region, and the credentials are found and accepted (HeadBucket needs s3:ListBucket)."""
        return await asyncio.to_thread(self._check_bucket)

    def _check_bucket(self) -> str | None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            CredentialRetrievalError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        # A client of its own: short timeouts, and nothing shared with deliveries starting meanwhile.
        timeout = min(self.config.connect_timeout_secs, PREFLIGHT_CALL_TIMEOUT_SECS)
        bucket = self.config.bucket
        client: Any = None
        try:
            # Making the client resolves the credentials (environment, profile, container or
            # instance role): it fails here when they cannot be loaded.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.config.endpoint_url,
                region_name=self.config.region,
                aws_access_key_id=self.config.access_key_id,
                aws_secret_access_key=self.config.secret_access_key,
                config=Config(connect_timeout=timeout, read_timeout=PREFLIGHT_CALL_TIMEOUT_SECS,
                              retries={"max_attempts": 1, "mode": "standard"}),
            )
            client.head_bucket(Bucket=bucket)
            return None
        except NoCredentialsError:
            return ("no credentials found (neither access_key_id/secret_access_key nor the AWS environment, "
                    "profile, or container or instance role)")
        except PartialCredentialsError as exc:
            return f"incomplete credentials: {exc}"
        except CredentialRetrievalError as exc:
            return f"credentials could not be loaded: {exc}"
        except ClientError as exc:
            return self._explain(client, exc)
        except BotoCoreError as exc:  # connection refused, timeout, an endpoint that does not resolve
            return f"S3 could not be reached: {exc}"
        finally:
            if client is not None:
                client.close()

    def _explain(self, client: Any, exc: Exception) -> str:
        """What a failed HeadBucket means. Its answer has no body, so a 403 is asked again with a
        GET (ListObjectsV2 of one key) whose error code tells bad credentials from a policy."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket = self.config.bucket
        response: dict[str, Any] = getattr(exc, "response", {})
        meta = response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        code = str(response.get("Error", {}).get("Code", status))
        if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
            return f"bucket '{bucket}' does not exist"
        region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if status in (301, 400) and region and region != self.config.region:
            return f"bucket '{bucket}' is in region '{region}', not '{self.config.region}' (destination region)"
        if status == 403:
            try:
                client.list_objects_v2(Bucket=bucket, MaxKeys=1)
            except ClientError as again:
                code = str(again.response.get("Error", {}).get("Code", code))
            except BotoCoreError:
                pass
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "TokenRefreshRequired"):
                return f"the credentials were refused ({code})"
            return (f"access to bucket '{bucket}' is denied ({code}): the credentials lack s3:ListBucket "
                    "on it, or the bucket belongs to another account")
        return f"HeadBucket on bucket '{bucket}' failed: {code}"

    def _store(self, key: str, data: bytes) -> None:
        codec = self.config.codec
        extra: dict[str, Any] = {"ContentType": "application/octet-stream"}
        if codec.content_encoding:
            extra["ContentEncoding"] = codec.content_encoding
        client = self._s3()
        if len(data) >= self.config.multipart_threshold_mib << 20:
            from boto3.s3.transfer import TransferConfig

            tc = TransferConfig(
                multipart_threshold=self.config.multipart_threshold_mib << 20,
                multipart_chunksize=8 << 20,
                max_concurrency=4,
            )
            client.upload_fileobj(io.BytesIO(data), self.config.bucket, key, ExtraArgs=extra, Config=tc)
        else:
            client.put_object(Bucket=self.config.bucket, Key=key, Body=data, **extra)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _classify(exc: Exception) -> tuple[str, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = err.get("Code") or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "Unknown"))
        if code in ("InternalError", "ServiceUnavailable", "SlowDown", "500", "503"):
            return "InternalError", str(err.get("Message") or exc)
        return f"S3.{code}", str(err.get("Message") or exc)
    return "S3.ConnectionError", f"{type(exc).__name__}: {exc}"
