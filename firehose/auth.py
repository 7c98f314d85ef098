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
    return hmac.new(key, msg.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(("AWS4" + secret).encode("utf-8", "surrogateescape"), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


class PendingSignature:
    """A request whose headers passed every check that does not need its body (a known access
    key, the clock skew, the credential scope, ``host`` among the signed headers, a payload hash
    of the form this API takes). :meth:`verify` finishes the check once the body's SHA-256 is
    known, computed over the bytes received, before any Content-Encoding is undone."""

    def __init__(self, akid: str, secret: str, date: str, region: str, svc: str, amz_date: str,
                 canonical_head: str, signed: str, signature: str, declared_hash: str | None) -> None:
        self.akid = akid
        self._secret = secret
        self._date, self._region, self._svc = date, region, svc
        self._amz_date = amz_date
        self._canonical_head = canonical_head
        self._signed = signed
        self._signature = signature
        self.declared_hash = declared_hash

    def verify(self, body_sha256: str) -> str:
        """Check the signature over the body whose SHA-256 (hex) is given; returns the access key."""
        if self.declared_hash is not None and not hmac.compare_digest(self.declared_hash, body_sha256):
            raise AuthError("InvalidSignatureException",
                            "The provided x-amz-content-sha256 header does not match what was computed.")
        canonical = f"{self._canonical_head}\n{self._signed}\n{body_sha256}"
        scope = f"{self._date}/{self._region}/{self._svc}/aws4_request"
        # Header bytes that are not UTF-8 come from aiohttp as surrogate escapes: hash the bytes sent.
        digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
        to_sign = "\n".join([ALGORITHM, self._amz_date, scope, digest])
        key = signing_key(self._secret, self._date, self._region, self._svc)
        expected = hmac.new(key, to_sign.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self._signature):
            raise AuthError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. Check your AWS "
                "Secret Access Key and signing method. Consult the service documentation for details.",
            )
        return self.akid


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def preverify(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str] | list[tuple[str, str]],
    credentials: Mapping[str, str],
    *,
    service: str = "firehose",
    now: datetime | None = None,
) -> PendingSignature:
    """Every SigV4 check that needs no body; raises :class:`AuthError`. ``headers`` may repeat a
    name (values are joined with ``,`` as SigV4 does)."""
    by_name: dict[str, list[str]] = {}
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        by_name.setdefault(name.lower(), []).append(value)
    m = _authorization(by_name)
    akid, date, region, svc = _scope(m.group("cred"), service)
    secret = credentials.get(akid)
    if secret is None:
        raise AuthError("UnrecognizedClientException", "The security token included in the request is invalid.")
    amz_date = (by_name.get("x-amz-date") or [""])[0]
    _check_date(amz_date, date, now or datetime.now(UTC))
    signed = m.group("signed")
    canonical_query = "&".join(
        sorted(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, _, v in
               (pair.partition("=") for pair in query.split("&") if pair))
    )
    head = "\n".join([method.upper(), quote(path or "/", safe="/-_.~"), canonical_query,
                      _canonical_headers(signed, by_name)])
    return PendingSignature(akid, secret, date, region, svc, amz_date, head, signed, m.group("sig"),
                            _declared_hash(by_name))


def _authorization(by_name: dict[str, list[str]]) -> re.Match[str]:
    auth = ",".join(by_name.get("authorization", []))
    if not auth:
        raise AuthError("MissingAuthenticationTokenException", "Missing Authentication Token", 403)
    m = _AUTH_RE.match(auth.strip())
    if m is None:
        raise AuthError("IncompleteSignatureException", "Authorization header requires Credential, SignedHeaders "
                        "and Signature for AWS4-HMAC-SHA256", 400)
    return m


def _scope(credential: str, service: str) -> tuple[str, str, str, str]:
    """(access key id, date, region, service) of a ``Credential=`` value, scoped to ``service``."""
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AuthError("IncompleteSignatureException", "Credential should be scoped correctly")
    akid, date, region, svc, _ = parts
    if svc != service:
        raise AuthError("InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'.")
    return akid, date, region, svc


def _check_date(amz_date: str, scope_date: str, current: datetime) -> None:
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise AuthError("IncompleteSignatureException", "X-Amz-Date header is missing or malformed") from None
    if amz_date[:8] != scope_date:
        raise AuthError("InvalidSignatureException", "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP")
    if when < current - MAX_SKEW:
        raise AuthError("InvalidSignatureException", f"Signature expired: {amz_date} is now earlier than "
                        f"{(current - MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({current.strftime('%Y%m%dT%H%M%SZ')} - 5 min.)")
    if when > current + MAX_SKEW:
        raise AuthError("InvalidSignatureException", f"Signature not yet current: {amz_date} is still later than "
                        f"{(current + MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')} ({current.strftime('%Y%m%dT%H%M%SZ')} + 5 min.)")


def _canonical_headers(signed: str, by_name: dict[str, list[str]]) -> str:
    """The canonical headers block for ``SignedHeaders``, which must include ``host``."""
    names = signed.split(";")
    if "host" not in names:
        raise AuthError("InvalidSignatureException", "'Host' must be a 'SignedHeader' in the AWS Authorization.")
    out = ""
    for name in names:
        values = by_name.get(name)
        if values is None:
            raise AuthError("InvalidSignatureException", f"Signed header '{name}' is missing from the request")
        out += f"{name}:{','.join(_WS_RE.sub(' ', v.strip()) for v in values)}\n"
    return out


def _declared_hash(by_name: dict[str, list[str]]) -> str | None:
    """``x-amz-content-sha256`` when sent; UNSIGNED-PAYLOAD and the STREAMING-* chunked forms
    leave the body unsigned and are refused."""
    declared = by_name.get("x-amz-content-sha256")
    if declared is None:
        return None
    value = declared[0].strip().lower()
    if not _HEX64.match(value):
        raise AuthError("InvalidSignatureException",
                        "x-amz-content-sha256 must be the hex SHA-256 of the payload: unsigned and "
                        "streaming payloads are not accepted by this API.")
    return value


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
    """Check a request's SigV4 signature over ``body`` (the bytes as received); returns the
    access key id, or raises :class:`AuthError`."""
    pending = preverify(method, path, query, headers, credentials, service=service, now=now)
    return pending.verify(hashlib.sha256(body).hexdigest())
