"""An AWS Lambda function as a Firehose transformation: boto3's ``Invoke``, with Firehose's error codes."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Final

import orjson

from firehose.transforms.lambda_ import (
    _ARN_RE,
    FUNCTION_ERROR,
    INVOKE_ACCESS_DENIED,
    INVOKE_LIMIT_EXCEEDED,
    PAYLOAD_TOO_LARGE,
    RESOURCE_NOT_FOUND,
    SERVICE_EXCEPTION,
    TIMEOUT,
    TIMEOUT_MESSAGE,
    Invoker,
    LambdaInvocationError,
    _reject,
)

__all__ = ["RemoteFunction"]


# botocore error codes of the Invoke operation -> Firehose's codes (§11). The VPC ones keep their
# Lambda names, as Firehose reports them; anything unlisted becomes Lambda.ServiceException.
_CLIENT_ERROR_CODES: Final = {
    "TooManyRequestsException": INVOKE_LIMIT_EXCEEDED,
    "ResourceNotFoundException": RESOURCE_NOT_FOUND,
    "AccessDeniedException": INVOKE_ACCESS_DENIED,
    "AccessDeniedError": INVOKE_ACCESS_DENIED,
    "RequestEntityTooLargeException": PAYLOAD_TOO_LARGE,
    "RequestTooLargeException": PAYLOAD_TOO_LARGE,
    "SerializedRequestEntityTooLargeException": PAYLOAD_TOO_LARGE,
    "InvalidSubnetIDException": "Lambda.InvalidSubnetIDException",
    "InvalidSecurityGroupIDException": "Lambda.InvalidSecurityGroupIDException",
    "SubnetIPAddressLimitReachedException": "Lambda.SubnetIPAddressLimitReachedException",
    "ENILimitReachedException": "Lambda.ENILimitReachedException",
}
_CLIENT_ERROR_TEXT: Final = {
    INVOKE_LIMIT_EXCEEDED: "The Lambda concurrent execution limit is exceeded. Increase the concurrent "
    "execution limit.",
    RESOURCE_NOT_FOUND: "The specified Lambda function does not exist. "
    "Use a different function that does exist.",
    INVOKE_ACCESS_DENIED: "Access was denied. "
    "Ensure that the access policy allows access to the Lambda function.",
}


class RemoteFunction(Invoker):
    """An AWS Lambda function called through boto3's ``Invoke`` (``InvocationType="RequestResponse"``).

    ``function`` is a name, partial ARN or ARN (optionally qualified); it is also :attr:`name`.
    ``region`` defaults to the ARN's region; ``endpoint_url`` points at a Lambda-compatible
    endpoint. Each call runs in a thread (``asyncio.to_thread``) with botocore's own retries off
    (one HTTP request per :meth:`invoke`: retrying is :func:`invoke_with_retries`' job, as in
    Firehose) and a read timeout of ``timeout_secs``. Failures raise :class:`LambdaInvocationError`:

    * a function error (``X-Amz-Function-Error``) -> ``Lambda.FunctionError`` with
      ``"<errorType>: <errorMessage>"`` from the payload (just ``errorMessage`` without a type);
    * ``TooManyRequestsException`` -> ``Lambda.InvokeLimitExceeded``;
      ``ResourceNotFoundException`` -> ``Lambda.ResourceNotFound``; ``AccessDeniedException`` ->
      ``Lambda.InvokeAccessDenied``; a 413 (``RequestEntityTooLargeException``) ->
      ``Lambda.PayloadTooLarge``; the VPC errors keep their names (``Lambda.ENILimitReachedException``...);
    * no response within ``timeout_secs`` -> ``Lambda.Timeout``;
    * any other service or connection error -> ``Lambda.ServiceException``;
    * a payload that is not JSON -> ``Lambda.JsonProcessingException``.

    ``session`` (a ``boto3.session.Session``) supplies credentials; the default session chain is
    used otherwise. The client is created on first use, in a worker thread.
    """

    def __init__(
        self,
        function: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout_secs: float = 300.0,
        connect_timeout_secs: float = 10.0,
        qualifier: str | None = None,
        session: Any = None,
        max_connections: int = 10,
    ) -> None:
        arn = _ARN_RE.match(function)
        self.name = function
        self.function = function
        self.region = region or (arn["region"] if arn and arn["region"] else None)
        self.endpoint_url = endpoint_url
        self.timeout_secs = timeout_secs
        self.connect_timeout_secs = connect_timeout_secs
        self.qualifier = qualifier
        self._session = session
        self._max_connections = max_connections
        self._client: Any = None
        self._client_lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._client_lock:  # botocore client creation is not thread-safe
            if self._client is None:
                import boto3
                from botocore.config import Config

                session = self._session or boto3.session.Session()
                self._client = session.client(
                    "lambda",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=Config(
                        read_timeout=self.timeout_secs,
                        connect_timeout=self.connect_timeout_secs,
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        max_pool_connections=self._max_connections,
                    ),
                )
            return self._client

    async def invoke(self, event: dict[str, Any]) -> object:
        """Invoke the function with ``event`` (serialised as JSON) and return the decoded response."""
        body = orjson.dumps(event)
        return await asyncio.to_thread(self._invoke_blocking, body)

    def _invoke_blocking(self, body: bytes) -> object:
        from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

        kwargs: dict[str, Any] = {
            "FunctionName": self.function,
            "InvocationType": "RequestResponse",
            "Payload": body,
        }
        if self.qualifier:
            kwargs["Qualifier"] = self.qualifier
        try:
            response = self._get_client().invoke(**kwargs)
            payload: bytes = response["Payload"].read()
        except ClientError as exc:
            raise _client_error(exc) from None
        except ReadTimeoutError:
            raise LambdaInvocationError(TIMEOUT, TIMEOUT_MESSAGE) from None
        except (BotoCoreError, OSError) as exc:
            raise LambdaInvocationError(SERVICE_EXCEPTION, f"{type(exc).__name__}: {exc}") from None
        if response.get("FunctionError"):
            raise LambdaInvocationError(FUNCTION_ERROR, _function_error_message(payload))
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise _reject(f"the response is not JSON: {exc}") from None

    async def close(self) -> None:
        """Close the client's connection pool."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _client_error(exc: Any) -> LambdaInvocationError:
    error = exc.response.get("Error", {})
    service_code = str(error.get("Code", "")) or "Unknown"
    service_message = str(error.get("Message", "")) or str(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = _CLIENT_ERROR_CODES.get(service_code)
    if code is None:
        code = PAYLOAD_TOO_LARGE if status == 413 else SERVICE_EXCEPTION
    text = _CLIENT_ERROR_TEXT.get(code)
    detail = f"{service_code}: {service_message}"
    return LambdaInvocationError(code, f"{text} ({detail})" if text else detail)


def _function_error_message(payload: bytes) -> str:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload.decode("utf-8", "replace")[:1000]
    if isinstance(body, dict) and "errorMessage" in body:
        message = str(body["errorMessage"])
        error_type = body.get("errorType")
        return f"{error_type}: {message}" if error_type else message
    return payload.decode("utf-8", "replace")[:1000]
