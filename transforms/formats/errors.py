"""Error codes and exceptions of record format conversion."""

from __future__ import annotations

from typing import Final

PARSE_ERROR: Final = "DataFormatConversion.ParseError"
MALFORMED_DATA: Final = "DataFormatConversion.MalformedData"
INVALID_SCHEMA: Final = "DataFormatConversion.InvalidSchema"
ENTITY_NOT_FOUND: Final = "DataFormatConversion.EntityNotFound"


class SchemaError(ValueError):
    """The schema cannot be used; ``code`` is ``INVALID_SCHEMA`` or ``ENTITY_NOT_FOUND``."""

    def __init__(self, message: str, code: str = INVALID_SCHEMA) -> None:
        super().__init__(message)
        self.code = code


class ConversionError(ValueError):
    """``convert`` was given records that do not convert.

    ``failures`` maps the index of each such record (in the list passed to ``convert``) to its
    ``(error_code, error_message)``, exactly what ``check`` returns for it.
    """

    def __init__(self, failures: dict[int, tuple[str, str]]) -> None:
        first = min(failures)
        code, message = failures[first]
        super().__init__(f"{len(failures)} record(s) do not convert; record {first}: {code}: {message}")
        self.failures = failures
