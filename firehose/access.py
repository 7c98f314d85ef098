"""Access control per access key, as IAM-lite (``api.auth.credentials``).

With ``api.auth.mode: sigv4`` every request is signed with one of the configured key pairs. The
plain form ``AKID: secret`` lets that key do everything, as before. The long form limits it::

    credentials:
      AKIAPRODUCER: {secret_file: /etc/firehose/producer.secret, allow: ["firehose:PutRecord*"], streams: ["clicks-*"]}
      AKIAREADER: {secret: "${READER_SECRET}", allow: ["firehose:Describe*", "firehose:List*"]}

``allow`` holds IAM action patterns (``firehose:<Operation>``, ``*`` and ``?`` wildcards,
matched without regard to case as IAM matches actions); ``streams`` holds delivery stream name
patterns (``*`` and ``?``, case-sensitive, as IAM matches resource ARNs). A call is allowed when
its action matches an ``allow`` entry and, for a call on a stream, the stream's name matches a
``streams`` entry; ``ListDeliveryStreams`` lists only the streams the key may see. Anything else
is answered with the ``AccessDeniedException`` AWS services use (HTTP 400), naming the action and
the resource ARN, before the daemon says anything about the stream. A ``secret_file`` is read when
the config is loaded and on every SIGHUP (one trailing newline stripped), so secrets stay out of
the config and rotate without a restart.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from firehose.models import StrictModel

__all__ = ["AuthConfig", "KeyPolicy", "denied_message"]

_ACTION_RE = re.compile(r"^firehose:[A-Za-z*?]+$")
_STREAM_PATTERN_RE = re.compile(r"^[a-zA-Z0-9_.*?-]{1,64}$")


class KeyPolicy(StrictModel):
    """One access key: its secret (inline or from a file) and what it may do."""

    secret: str | None = Field(default=None, description="The secret access key (write it as `${ENV}`).")
    secret_file: str | None = Field(
        default=None, description="A file holding the secret access key instead (read at start and on SIGHUP; "
        "one trailing newline stripped).")
    allow: list[str] = Field(
        default=["firehose:*"],
        description="IAM action patterns the key may call, `firehose:<Operation>` with `*`/`?` wildcards "
        "(e.g. `firehose:PutRecord*`); default: every action.")
    streams: list[str] = Field(
        default=["*"],
        description="Delivery stream name patterns (`*`/`?`) the key may act on and see in "
        "ListDeliveryStreams; default: every stream.")
    _secret: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, v: Any) -> Any:
        # The plain form, AKID: secret, is a key that may do everything.
        if isinstance(v, str):
            return {"secret": v}
        if not isinstance(v, dict):
            raise ValueError("must be the secret, or a mapping of secret or secret_file, allow and streams")
        return v

    @field_validator("allow")
    @classmethod
    def _actions(cls, v: list[str]) -> list[str]:
        for action in v:
            if not _ACTION_RE.match(action):
                raise ValueError(f"{action!r} is not an action pattern like firehose:PutRecord*")
        return v

    @field_validator("streams")
    @classmethod
    def _streams(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not _STREAM_PATTERN_RE.match(pattern):
                raise ValueError(f"{pattern!r} is not a stream name pattern ([a-zA-Z0-9_.-], * and ?)")
        return v

    @model_validator(mode="after")
    def _load_secret(self) -> KeyPolicy:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret and secret_file")
        if self.secret_file is not None:
            try:
                with open(self.secret_file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read secret_file {self.secret_file}: "
                                 f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
            text = text[:-1] if text.endswith("\n") else text
            self._secret = text[:-1] if text.endswith("\r") else text
        else:
            self._secret = self.secret or ""
        if not self._secret:
            raise ValueError("the secret is empty")
        return self

    @property
    def secret_value(self) -> str:
        return self._secret

    @property
    def unlimited(self) -> bool:
        return "firehose:*" in self.allow and "*" in self.streams

    def allows_action(self, action: str) -> bool:
        lowered = action.lower()
        return any(fnmatchcase(lowered, pattern.lower()) for pattern in self.allow)

    def allows_stream(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.streams)


def denied_message(akid: str, account: str, action: str, resource: str) -> str:
    """AWS's wording for an identity-based policy that does not allow a call."""
    return (f"User: arn:aws:iam::{account}:user/{akid} is not authorized to perform: {action} on resource: "
            f"{resource} because no identity-based policy allows the {action} action")


class AuthConfig(StrictModel):
    """``mode: sigv4`` verifies AWS Signature Version 4 on every API request against
    ``credentials`` (access key id -> secret; use ``${ENV}`` for secrets). ``none`` accepts any."""

    mode: Literal["none", "sigv4"] = Field(
        default="none",
        description="How API requests are authenticated: `none` accepts every request; `sigv4` verifies "
        "each request's AWS Signature Version 4 against `credentials` (Firehose: IAM request signing).",
    )
    credentials: dict[str, KeyPolicy] = Field(
        default={},
        description="Access key id -> secret access key (`${ENV}`), the key pairs `sigv4` accepts, each allowed "
        "everything; or access key id -> `{secret | secret_file, allow, streams}` to limit what the key may call "
        "and on which streams (docs: firehose/access.py). At least one with `mode: sigv4`; reloaded on SIGHUP.",
    )
    _secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("credentials")
    @classmethod
    def _creds(cls, v: dict[str, KeyPolicy]) -> dict[str, KeyPolicy]:
        if any(not key for key in v):
            raise ValueError("every access key id must be non-empty")
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.mode == "sigv4" and not self.credentials:
            raise ValueError("mode sigv4 needs at least one entry in credentials")
        self._secrets = {k: v.secret_value for k, v in self.credentials.items()}

    @property
    def secrets(self) -> dict[str, str]:
        """Access key id -> secret, whichever form the key was given in."""
        return self._secrets

    def policy(self, akid: str) -> KeyPolicy | None:
        """The key's limits; None for a key that may do everything (the plain form)."""
        entry = self.credentials.get(akid)
        return None if entry is None or entry.unlimited else entry
