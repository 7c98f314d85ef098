"""Array helpers shared by the conversion kernels: row-level errors, masks, messages."""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_I64: TypeAlias = "np.ndarray[Any, np.dtype[np.int64]]"
_MASK: TypeAlias = "np.ndarray[Any, np.dtype[np.bool_]]"


class _Errs:
    """Row-level failures found by the kernels: indices into the array being converted and one
    message each. Parents translate indices (a list maps item indices to its own rows)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray[Any, Any], list[str]]] = []

    def add(self, rows: np.ndarray[Any, Any], messages: list[str]) -> None:
        if len(rows):
            self.parts.append((np.asarray(rows, dtype=np.int64), messages))

    def extend(self, other: _Errs, mapping: np.ndarray[Any, Any] | None = None) -> None:
        for rows, messages in other.parts:
            self.parts.append((rows if mapping is None else mapping[rows], messages))

    def first_by_row(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for rows, messages in self.parts:
            for row, message in zip(rows.tolist(), messages, strict=True):
                out.setdefault(row, message)
        return out


def _valid(arr: pa.Array) -> _MASK:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _np_bool(arr: pa.Array) -> _MASK:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _np_int(arr: pa.Array, default: int) -> _I64:
    return np.asarray(arr.fill_null(default).to_numpy(zero_copy_only=False), dtype=np.int64)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _messages(arr: pa.Array, rows: np.ndarray[Any, Any], template: str) -> list[str]:
    values = arr.take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []
    return [template.format(value=_show(v)) for v in values]


def _null_where(arr: pa.Array, mask: _MASK) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.scalar(None, arr.type), arr)
