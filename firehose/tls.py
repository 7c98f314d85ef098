"""TLS for the API (``api.tls``) and the ``firehose_http`` source (``tls`` on the source).

The certificate chain and key are PEM files. They are loaded when the config is validated (a
missing file, a file that is not PEM, or a key that does not match the certificate is reported at
its line, like any other config error) and again on every SIGHUP, so a renewed certificate
(certbot, a cert-manager sidecar) takes effect without a restart: connections already open keep
theirs, new handshakes get the new one. A reload whose files do not load keeps the previous
certificate and logs why. TLS 1.2 is the oldest version offered.
"""

from __future__ import annotations

import ssl
import weakref

import structlog
from pydantic import Field, model_validator

from firehose.models import StrictModel

__all__ = ["TlsConfig", "TlsContext", "reload_all"]

log = structlog.get_logger()


class TlsConfig(StrictModel):
    """A server certificate: HTTPS instead of HTTP on this address."""

    cert: str = Field(description="PEM file with the server certificate, followed by any intermediates.")
    key: str = Field(description="PEM file with the certificate's private key (unencrypted).")

    @model_validator(mode="after")
    def _loads(self) -> TlsConfig:
        _load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), self)
        return self


def _load(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except FileNotFoundError as exc:
        raise ValueError(f"cannot read {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise ValueError(f"cannot read {exc.filename}: permission denied") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ValueError(f"the certificate {cfg.cert} and key {cfg.key} do not load as a PEM pair ({reason})") from None


class TlsContext:
    """The server-side SSL context of one listening address, reloadable in place."""

    def __init__(self, cfg: TlsConfig) -> None:
        self.cfg = cfg
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load(self.context, cfg)
        _live.add(self)

    def reload(self, cfg: TlsConfig | None = None) -> bool:
        """Load the certificate and key again (from ``cfg``'s paths when given); on failure the
        previous pair stays in use. Returns whether the new pair loaded."""
        cfg = cfg or self.cfg
        try:
            # Tried on a scratch context first: a pair that fails half way must not leave the
            # live context with a certificate and no matching key.
            _load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), cfg)
            _load(self.context, cfg)
        except ValueError as exc:
            log.error("tls_reload_failed", cert=cfg.cert, error=str(exc))
            return False
        self.cfg = cfg
        log.info("tls_reloaded", cert=cfg.cert)
        return True


_live: weakref.WeakSet[TlsContext] = weakref.WeakSet()


def reload_all() -> None:
    """SIGHUP: every listening address's certificate and key read again from their files."""
    for ctx in list(_live):
        ctx.reload()
