"""Glue/Hive type strings: parsing ``struct<id:bigint,tags:array<string>>`` into a type tree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias


@dataclass(frozen=True)
class HivePrimitive:
    """A primitive type; ``args`` holds decimal (precision, scale) or char/varchar (length)."""

    name: str
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class HiveArray:
    item: HiveType


@dataclass(frozen=True)
class HiveMap:
    key: HivePrimitive
    value: HiveType


@dataclass(frozen=True)
class HiveStruct:
    fields: tuple[tuple[str, HiveType], ...]


HiveType: TypeAlias = HivePrimitive | HiveArray | HiveMap | HiveStruct

_PRIMITIVES: Final = {
    "boolean": "boolean",
    "tinyint": "tinyint",
    "smallint": "smallint",
    "int": "int",
    "integer": "int",
    "bigint": "bigint",
    "float": "float",
    "double": "double",
    "decimal": "decimal",
    "numeric": "decimal",
    "dec": "decimal",
    "string": "string",
    "char": "char",
    "varchar": "varchar",
    "binary": "binary",
    "date": "date",
    "timestamp": "timestamp",
}
# Known to Hive but not convertible from JSON here (the Hive JSON SerDe rejects uniontype).
_UNSUPPORTED: Final = {"uniontype", "interval_year_month", "interval_day_time", "void", "interval"}


class _TypeParser:
    """Recursive-descent parser for Hive type strings, reporting 0-based character positions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> ValueError:
        where = self.pos if pos is None else pos
        return ValueError(f"{message} at position {where} in {self.text!r}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_ws()
        if self.pos >= len(self.text):
            raise self.fail(f"expected {char!r} but the type string ended")
        if self.text[self.pos] != char:
            raise self.fail(f"expected {char!r}, found {self.text[self.pos]!r}")
        self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def word(self) -> tuple[str, int]:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] == "_"):
            self.pos += 1
        return self.text[start : self.pos], start

    def integer(self) -> int:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a number")
        return int(self.text[start : self.pos])

    def parse(self) -> HiveType:
        result = self.type_()
        self.skip_ws()
        if self.pos != len(self.text):
            raise self.fail(f"unexpected {self.text[self.pos :]!r} after the type")
        return result

    def type_(self) -> HiveType:
        name, start = self.word()
        if not name:
            if self.pos >= len(self.text):
                raise self.fail("expected a type name but the type string ended")
            raise self.fail(f"expected a type name, found {self.text[self.pos]!r}")
        lname = name.lower()
        if lname == "array":
            self.expect("<")
            item = self.type_()
            self.expect(">")
            return HiveArray(item)
        if lname == "map":
            self.expect("<")
            key_start = self.pos
            self.skip_ws()
            key_start = self.pos
            key = self.type_()
            if not isinstance(key, HivePrimitive):
                raise self.fail("map keys must have a primitive type", key_start)
            self.expect(",")
            value = self.type_()
            self.expect(">")
            return HiveMap(key, value)
        if lname == "struct":
            return self.struct()
        if lname in _UNSUPPORTED:
            raise self.fail(f"unsupported type {name!r}", start)
        if lname not in _PRIMITIVES:
            raise self.fail(f"unknown type {name!r}", start)
        canonical = _PRIMITIVES[lname]
        if canonical == "decimal":
            precision, scale = 10, 0  # Hive's default for a bare DECIMAL
            if self.peek() == "(":
                self.expect("(")
                arg_pos = self.pos
                precision = self.integer()
                if self.peek() == ",":
                    self.expect(",")
                    scale = self.integer()
                self.expect(")")
                if not 1 <= precision <= 38:
                    raise self.fail(f"decimal precision must be 1..38, got {precision}", arg_pos)
                if scale > precision:
                    raise self.fail(f"decimal scale {scale} exceeds precision {precision}", arg_pos)
            return HivePrimitive("decimal", (precision, scale))
        if canonical in ("char", "varchar"):
            limit = 255 if canonical == "char" else 65535
            if self.peek() != "(":
                raise self.fail(f"{canonical} needs a length, e.g. {canonical}(10)")
            self.expect("(")
            arg_pos = self.pos
            length = self.integer()
            self.expect(")")
            if not 1 <= length <= limit:
                raise self.fail(f"{canonical} length must be 1..{limit}, got {length}", arg_pos)
            return HivePrimitive(canonical, (length,))
        return HivePrimitive(canonical)

    def struct(self) -> HiveStruct:
        self.expect("<")
        fields: list[tuple[str, HiveType]] = []
        seen: set[str] = set()
        while True:
            self.skip_ws()
            name_pos = self.pos
            name = self.field_name()
            if name.lower() in seen:
                raise self.fail(f"duplicate struct field {name!r}", name_pos)
            seen.add(name.lower())
            self.expect(":")
            fields.append((name, self.type_()))
            if self.peek() == ">":
                self.expect(">")
                return HiveStruct(tuple(fields))
            self.expect(",")

    def field_name(self) -> str:
        self.skip_ws()
        if self.pos < len(self.text) and self.text[self.pos] == "`":
            end = self.text.find("`", self.pos + 1)
            if end < 0:
                raise self.fail("unterminated backtick-quoted field name")
            name = self.text[self.pos + 1 : end]
            self.pos = end + 1
        else:
            start = self.pos
            while (
                self.pos < len(self.text)
                and self.text[self.pos] not in ":,<>`"
                and not self.text[self.pos].isspace()
            ):
                self.pos += 1
            name = self.text[start : self.pos]
        if not name:
            if self.pos >= len(self.text):
                raise self.fail("expected a struct field name but the type string ended")
            raise self.fail(f"expected a struct field name, found {self.text[self.pos]!r}")
        return name


def parse_hive_type(text: str) -> HiveType:
    """Parse a Glue/Hive type string (``struct<id:bigint,tags:array<string>>``).

    Type names are case-insensitive; struct field names may be backtick-quoted. Raises
    ``ValueError`` naming the problem and its 0-based position, e.g. ``unknown type 'strin' at
    position 25 in 'struct<id:bigint,country:strin>'``.
    """
    return _TypeParser(text).parse()
