"""KPL aggregated records: byte-exact de-aggregation (and aggregation, for fixtures).

The Kinesis Producer Library packs many *user records* into one Kinesis record whose ``Data`` is::

    bytes 0..3        magic F3 89 9A C2
    bytes 4..len-17   protobuf (proto2) AggregatedRecord
    last 16 bytes     MD5 of the protobuf bytes (not of the magic)

    message AggregatedRecord {
      repeated string partition_key_table     = 1;
      repeated string explicit_hash_key_table = 2;
      repeated Record records                 = 3;
    }
    message Record {
      required uint64 partition_key_index     = 1;
      optional uint64 explicit_hash_key_index = 2;
      required bytes  data                    = 3;
      repeated Tag    tags                    = 4;
    }
    message Tag { required string key = 1; optional string value = 2; }

The protobuf is parsed by hand (varints and length-delimited fields are all the schema uses), so the
daemon carries no protobuf runtime. The parser follows protobuf's own decoding rules wherever the
input is well formed -- fields in any order, the last value of a repeated singular field wins, a
known field number arriving with an unexpected wire type is treated as an unknown field, unknown
fields of wire types 0, 1, 2 and 5 are skipped -- and rejects with :class:`KplError` whatever a
producer could not have meant: truncated or over-long varints, lengths running past the end,
field number 0, groups and reserved wire types, missing required fields, partition-key or
explicit-hash-key strings that are not UTF-8, and table indexes out of range.

Unlike the KCL (which quietly passes a magic-prefixed record with a bad digest through as an
ordinary record), a record that carries the magic but does not verify is an error here: the magic
cannot begin UTF-8 text (``0xC2`` is not a continuation byte), so such a record is a damaged
aggregate, and handing its raw protobuf to a destination would be silent corruption.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DIGEST_SIZE",
    "MAGIC",
    "KplError",
    "UserRecord",
    "aggregate",
    "deaggregate",
    "is_aggregated",
]

#: The four bytes every KPL aggregate starts with.
MAGIC: Final = b"\xf3\x89\x9a\xc2"

#: Length of the MD5 trailer.
DIGEST_SIZE: Final = 16

# Protobuf wire types.
_VARINT: Final = 0
_I64: Final = 1
_LEN: Final = 2
_SGROUP: Final = 3
_EGROUP: Final = 4
_I32: Final = 5

# A tag's field number must fit in 29 bits (protobuf's kMaxFieldNumber).
_MAX_FIELD_NUMBER: Final = (1 << 29) - 1
_UINT64_MAX: Final = (1 << 64) - 1


@dataclass(frozen=True)
class UserRecord:
    """One user record unpacked from an aggregate.

    ``sub_sequence`` is the record's position in the aggregate (0, 1, 2, ...), which is the
    sub-sequence number Kinesis consumers report alongside the outer record's sequence number.
    ``explicit_hash_key`` is ``None`` when the record did not set ``explicit_hash_key_index``.
    """

    partition_key: str
    explicit_hash_key: str | None
    data: bytes
    sub_sequence: int


class KplError(ValueError):
    """A record that starts with the KPL magic but is not a valid aggregate.

    Raised for an MD5 mismatch, malformed protobuf, missing required fields and table indexes out
    of range. The message names the problem and, for wire-format faults, the byte offset within
    the whole record (magic included), so an operator can find it in a hex dump of the raw data.
    """


def is_aggregated(data: bytes) -> bool:
    """Whether ``data`` is shaped like a KPL aggregate: the magic, then more than 16 bytes.

    This is the KCL's length-and-magic test only; it does not verify the digest or the protobuf
    (:func:`deaggregate` does). A magic followed by exactly the 16-byte trailer -- an empty
    protobuf -- is not an aggregate, as in the KCL and the aws-kinesis-agg library.
    """
    return len(data) > len(MAGIC) + DIGEST_SIZE and data.startswith(MAGIC)


def deaggregate(data: bytes) -> list[UserRecord] | None:
    """Unpack a KPL aggregate into its user records, in order.

    Returns ``None`` when ``data`` is not an aggregate (see :func:`is_aggregated`): the caller
    passes it on as an ordinary record. Returns the user records (possibly an empty list, for an
    aggregate that holds none) when it is one. Raises :class:`KplError` when ``data`` has the
    magic but the MD5 trailer does not match the protobuf bytes or the protobuf is not a valid
    ``AggregatedRecord``; nothing is returned for a partly valid aggregate.
    """
    if not is_aggregated(data):
        return None
    start, end = len(MAGIC), len(data) - DIGEST_SIZE
    trailer = data[end:]
    # usedforsecurity=False: MD5 is a checksum here, and FIPS-mode OpenSSL refuses it otherwise.
    computed = hashlib.md5(memoryview(data)[start:end], usedforsecurity=False).digest()
    if computed != trailer:
        raise KplError(
            f"KPL aggregate MD5 mismatch: trailer {trailer.hex()} != MD5 of the "
            f"{end - start}-byte protobuf {computed.hex()}"
        )
    return _parse_aggregated_record(data, start, end)


def aggregate(
    records: Sequence[tuple[str, bytes]],
    explicit_hash_keys: Sequence[str | None] | None = None,
) -> bytes:
    """Pack ``(partition_key, data)`` pairs into one KPL aggregate, as the KPL would.

    ``explicit_hash_keys``, when given, has one entry per record (``None`` = that record has no
    explicit hash key). Partition keys and explicit hash keys are each stored once in their table
    (first-seen order), as the KPL and aws-kinesis-agg do, and fields are written in field-number
    order, so for the same input the bytes equal aws-kinesis-agg's. No Kinesis limits (key length,
    1 MiB record size, hash-key range) are enforced: fixtures may want to break them on purpose.
    Raises ``ValueError`` when ``explicit_hash_keys`` has the wrong length.
    """
    if explicit_hash_keys is not None and len(explicit_hash_keys) != len(records):
        raise ValueError(
            f"explicit_hash_keys has {len(explicit_hash_keys)} entries for {len(records)} records"
        )
    pk_index: dict[str, int] = {}
    ehk_index: dict[str, int] = {}
    encoded_records: list[bytes] = []
    for i, (partition_key, data) in enumerate(records):
        record = bytearray()
        record += _encode_varint_field(1, pk_index.setdefault(partition_key, len(pk_index)))
        ehk = explicit_hash_keys[i] if explicit_hash_keys is not None else None
        if ehk is not None:
            record += _encode_varint_field(2, ehk_index.setdefault(ehk, len(ehk_index)))
        record += _encode_len_field(3, bytes(data))
        encoded_records.append(bytes(record))
    body = bytearray()
    # dicts keep insertion order, which is exactly the index order assigned above.
    for key in pk_index:
        body += _encode_len_field(1, key.encode("utf-8"))
    for key in ehk_index:
        body += _encode_len_field(2, key.encode("utf-8"))
    for encoded in encoded_records:
        body += _encode_len_field(3, encoded)
    return MAGIC + bytes(body) + hashlib.md5(body, usedforsecurity=False).digest()


# --- decoding -------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``buf[pos]``; return ``(value, next_pos)``.

    Rejects varints that run past ``end``, that are longer than 10 bytes, or whose value does not
    fit in 64 bits (protobuf runtimes silently drop the excess bits; no encoder writes them).
    """
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise KplError(f"truncated varint at byte {start}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise KplError(f"varint longer than 10 bytes at byte {start}")
    if result > _UINT64_MAX:
        raise KplError(f"varint overflows 64 bits at byte {start}")
    return result, pos


@dataclass(frozen=True)
class _Field:
    """One field of a message: a varint's value, or the span of a length-delimited payload."""

    number: int
    wire_type: int
    offset: int  # where the field's tag starts, for error messages
    value: int = 0  # varint value (wire type 0)
    start: int = 0  # payload span (wire type 2)
    end: int = 0


def _iter_fields(buf: bytes, pos: int, end: int) -> Iterator[_Field]:
    """Walk the fields of the message occupying ``buf[pos:end]``.

    Yields varint and length-delimited fields; fixed-width fields (wire types 1 and 5) are bounds
    checked and skipped here because nothing in the schema uses them. Raises :class:`KplError` on
    anything that is not well-formed protobuf.
    """
    while pos < end:
        offset = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise KplError(f"invalid protobuf field number {number} at byte {offset}")
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield _Field(number, wire_type, offset, value=value)
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise KplError(
                    f"field {number} at byte {offset} declares {length} bytes but only "
                    f"{end - pos} remain"
                )
            yield _Field(number, wire_type, offset, start=pos, end=pos + length)
            pos += length
        elif wire_type in (_I64, _I32):
            width = 8 if wire_type == _I64 else 4
            if width > end - pos:
                raise KplError(f"truncated {width * 8}-bit field {number} at byte {offset}")
            pos += width
        elif wire_type in (_SGROUP, _EGROUP):
            # Groups are deprecated and no KPL encoder emits them; accepting them would mean
            # tracking nesting for data nobody can have written.
            raise KplError(f"unsupported protobuf group (field {number}) at byte {offset}")
        else:
            raise KplError(f"invalid protobuf wire type {wire_type} (field {number}) at byte {offset}")


def _decode_string(buf: bytes, field: _Field, what: str) -> str:
    try:
        return buf[field.start:field.end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KplError(f"{what} at byte {field.start + exc.start} is not valid UTF-8") from None


def _parse_aggregated_record(buf: bytes, pos: int, end: int) -> list[UserRecord]:
    fast = _parse_canonical(buf, pos, end)
    return fast if fast is not None else _parse_general(buf, pos, end)


def _parse_general(buf: bytes, pos: int, end: int) -> list[UserRecord]:
    partition_keys: list[str] = []
    explicit_hash_keys: list[str] = []
    record_fields: list[_Field] = []
    for field in _iter_fields(buf, pos, end):
        # A field with the right number but the wrong wire type is an unknown field to protobuf
        # decoders, so it is skipped rather than rejected, keeping us in step with them.
        if field.wire_type != _LEN:
            continue
        if field.number == 1:
            partition_keys.append(_decode_string(buf, field, "partition key"))
        elif field.number == 2:
            explicit_hash_keys.append(_decode_string(buf, field, "explicit hash key"))
        elif field.number == 3:
            # Resolved after the loop: the tables may legally come after the records.
            record_fields.append(field)
    return [
        _parse_record(buf, field, sub_sequence, partition_keys, explicit_hash_keys)
        for sub_sequence, field in enumerate(record_fields)
    ]


def _parse_canonical(buf: bytes, pos: int, end: int) -> list[UserRecord] | None:
    """The layout every KPL encoder writes, parsed without the general walk (~3x faster):
    top-level fields 1, 2 and 3 only, each record exactly ``partition_key_index``, an optional
    ``explicit_hash_key_index`` and ``data``, in that order, every index in range. Returns None for
    anything else, valid or not, which the general parser then decides (and names the fault of),
    so the result never differs from it."""
    partition_keys: list[str] = []
    explicit_hash_keys: list[str] = []
    spans: list[int] = []
    try:
        while pos < end:
            tag = buf[pos]
            length, pos = _short_varint(buf, pos + 1, end)
            stop = pos + length
            if stop > end:
                return None
            if tag == 0x1A:
                spans.append(pos)
                spans.append(stop)
            elif tag == 0x0A:
                partition_keys.append(buf[pos:stop].decode("utf-8"))
            elif tag == 0x12:
                explicit_hash_keys.append(buf[pos:stop].decode("utf-8"))
            else:
                return None
            pos = stop
        out: list[UserRecord] = []
        for i in range(0, len(spans), 2):
            p, stop = spans[i], spans[i + 1]
            if buf[p] != 0x08:
                return None
            pk, p = _short_varint(buf, p + 1, stop)
            ehk: str | None = None
            if buf[p] == 0x10:
                e, p = _short_varint(buf, p + 1, stop)
                ehk = explicit_hash_keys[e]
            if buf[p] != 0x1A:
                return None
            length, p = _short_varint(buf, p + 1, stop)
            if p + length != stop:
                return None
            out.append(UserRecord(partition_keys[pk], ehk, buf[p:stop], i >> 1))
        return out
    except (IndexError, KplError, UnicodeDecodeError):  # an index out of range among them
        return None


def _short_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """:func:`_read_varint` with the one-byte case inline. A byte read past ``end`` makes the
    caller's span check fail, so it is not checked here."""
    value = buf[pos]
    if value & 0x80:
        return _read_varint(buf, pos, end)
    return value, pos + 1


def _parse_record(
    buf: bytes,
    record: _Field,
    sub_sequence: int,
    partition_keys: list[str],
    explicit_hash_keys: list[str],
) -> UserRecord:
    pk_index: int | None = None
    ehk_index: int | None = None
    data: _Field | None = None
    for field in _iter_fields(buf, record.start, record.end):
        if field.number == 1 and field.wire_type == _VARINT:
            pk_index = field.value
        elif field.number == 2 and field.wire_type == _VARINT:
            ehk_index = field.value
        elif field.number == 3 and field.wire_type == _LEN:
            data = field
        elif field.number == 4 and field.wire_type == _LEN:
            # Tags are unused by KPL and KCL, but they are part of the message, so a broken one
            # makes the aggregate malformed.
            _check_tag(buf, field, sub_sequence)
    where = f"record {sub_sequence} (at byte {record.offset})"
    if pk_index is None:
        raise KplError(f"{where} has no partition_key_index")
    if data is None:
        raise KplError(f"{where} has no data")
    if pk_index >= len(partition_keys):
        raise KplError(
            f"{where}: partition_key_index {pk_index} out of range "
            f"(partition_key_table has {len(partition_keys)} entries)"
        )
    explicit_hash_key: str | None = None
    if ehk_index is not None:
        if ehk_index >= len(explicit_hash_keys):
            raise KplError(
                f"{where}: explicit_hash_key_index {ehk_index} out of range "
                f"(explicit_hash_key_table has {len(explicit_hash_keys)} entries)"
            )
        explicit_hash_key = explicit_hash_keys[ehk_index]
    return UserRecord(partition_keys[pk_index], explicit_hash_key, buf[data.start:data.end], sub_sequence)


def _check_tag(buf: bytes, tag: _Field, sub_sequence: int) -> None:
    has_key = False
    for field in _iter_fields(buf, tag.start, tag.end):
        if field.wire_type == _LEN and field.number in (1, 2):
            _decode_string(buf, field, f"tag of record {sub_sequence}")
            has_key = has_key or field.number == 1
    if not has_key:
        raise KplError(f"tag at byte {tag.offset} of record {sub_sequence} has no key")


# --- encoding -------------------------------------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3 | _VARINT) + _encode_varint(value)


def _encode_len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload
