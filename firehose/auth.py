"""Optional AWS Signature Version 4 verification of API requests (reference §1.7).

Clients sign with the service name ``firehose``. The canonical request is rebuilt from the
headers the client says it signed (its ``SignedHeaders``), not from our own choice, and the
region in the credential scope is accepted as given: with an endpoint override, SDKs sign with
whatever region they were configured with. Errors use the codes AWS's JSON front end answers with.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = timedelta(minutes=5)
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<sig>[0-9a-f]{64})$"
)
_WS_RE = re.compile(r"\s+")


class AuthError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(("AWS4" + secret).encode("utf-8"), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def verify(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str] | list[tuple[str, str]],
    body: bytes,
    credentials: Mapping[str, str],
    *,
    service: str = "firehose",
    now: datetime | None = None,
) -> str:
    """Check a request's SigV4 signature; returns the access key id, or raises :class:`AuthError`.

    ``headers`` may repeat a name (values are joined with ``,`` as SigV4 does)."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    by_name: dict[str, list[str]] = {}
    for name, value in items:
        by_name.setdefault(name.lower(), []).append(value)
    auth = ",".join(by_name.get("authorization", []))
    if not auth:
        raise AuthError("MissingAuthenticationTokenException", "Missing Authentication Token", 403)
    m = _AUTH_RE.match(auth.strip())
    if m is None:
        raise AuthError("IncompleteSignatureException", "Authorization header requires Credential, SignedHeaders "
                        "and Signature for AWS4-HMAC-SHA256", 400)
    parts = m.group("cred").split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AuthError("IncompleteSignatureException", f"Credential should be scoped correctly: {m.group('cred')}")
    akid, date, region, svc, _ = parts
    if svc != service:
        raise AuthError("InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'.")
    secret = credentials.get(akid)
    if secret is None:
        raise AuthError("UnrecognizedClientException", "The security token included in the request is invalid.")
    amz_date = (by_name.get("x-amz-date") or [""])[0]
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise AuthError("IncompleteSignatureException", "X-Amz-Date header is missing or malformed") from None
    if amz_date[:8] != date:
        raise AuthError("InvalidSignatureException", "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP")
    current = now or datetime.now(UTC)
    if when < current - MAX_SKEW:
        raise AuthError("InvalidSignatureException", f"Signature expired: {amz_date} is now earlier than "
                        f"{(current - MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({current.strftime('%Y%m%dT%H%M%SZ')} - 5 min.)")
    if when > current + MAX_SKEW:
        raise AuthError("InvalidSignatureException", f"Signature not yet current: {amz_date} is still later than "
                        f"{(current + MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({current.strftime('%Y%m%dT%H%M%SZ')} + 5 min.)")
    signed = m.group("signed")
    canonical_headers = ""
    for name in signed.split(";"):
        values = by_name.get(name)
        if values is None:
            raise AuthError("InvalidSignatureException", f"Signed header '{name}' is missing from the request")
        canonical_headers += f"{name}:{','.join(_WS_RE.sub(' ', v.strip()) for v in values)}\n"
    payload_hash = (by_name.get("x-amz-content-sha256") or [hashlib.sha256(body).hexdigest()])[0]
    canonical_query = "&".join(
        sorted(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, _, v in
               (pair.partition("=") for pair in query.split("&") if pair))
    )
    canonical = "\n".join([method.upper(), quote(path or "/", safe="/-_.~"), canonical_query, canonical_headers,
                           signed, payload_hash])
    scope = f"{date}/{region}/{svc}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    expected = hmac.new(signing_key(secret, date, region, svc), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m.group("sig")):
        raise AuthError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS "
            "Secret Access Key and signing method. Consult the service documentation for details.",
        )
    return akid
