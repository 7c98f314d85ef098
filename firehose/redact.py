"""Keeping secrets out of what the daemon shows: descriptions, health, errors and logs."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def url_without_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` removed (``https://user:pw@host/x`` -> ``https://host/x``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
