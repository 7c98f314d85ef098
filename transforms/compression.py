"""Compression codecs that write S3 object bodies the way Amazon Kinesis Data Firehose does.

Each ``CompressionFormat`` of an S3 destination maps to one :class:`Codec`. A codec turns a whole
object body (the concatenated records of one buffer flush) into the bytes that go to S3, and knows
the key extension and ``Content-Encoding`` that belong with it, so that every tool that reads
Firehose's objects today reads ours unchanged:

========  ==============  =========  ====================  =========================================
name      Firehose name   extension  Content-Encoding      body
========  ==============  =========  ====================  =========================================
none      UNCOMPRESSED    (none)     (none)                the bytes as given
gzip      GZIP            .gz        gzip                  one gzip member
zip       ZIP             .zip       zip                   a zip archive holding one DEFLATE entry
snappy    Snappy          .snappy    snappy-java           snappy-java (xerial) stream format
hadoop_…  HADOOP_SNAPPY   .snappy    hadoop-snappy         Hadoop block-compressor framing
========  ==============  =========  ====================  =========================================

Compression runs in a worker thread of the daemon, so every codec spends its time in C or Rust
code that releases the GIL (zlib, cramjam); the event loop keeps serving requests meanwhile.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

import cramjam

__all__ = [
    "CODEC_NAMES",
    "DEFLATE_LEVEL",
    "HADOOP_SNAPPY_BLOCK_SIZE",
    "SNAPPY_BLOCK_SIZE",
    "SNAPPY_JAVA_HEADER",
    "SNAPPY_JAVA_MAGIC",
    "BytesLike",
    "Codec",
    "get_codec",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview

#: zlib level for GZIP and ZIP. 6 is zlib's (and java.util.zip's) default, which is what Firehose's
#: JVM writers use when no level is given; it is also the usual speed/size balance point.
DEFLATE_LEVEL: Final = 6

#: Uncompressed bytes per block in the snappy-java stream: SnappyOutputStream.DEFAULT_BLOCK_SIZE.
SNAPPY_BLOCK_SIZE: Final = 32 * 1024

#: Uncompressed bytes per frame in the Hadoop framing. snappy-java's SnappyHadoopCompatibleOutputStream
#: uses its default 32 KiB block; anything up to Hadoop's 256 KiB codec buffer (minus its overhead
#: allowance) reads back, and 32 KiB keeps every frame well inside that.
HADOOP_SNAPPY_BLOCK_SIZE: Final = 32 * 1024

#: First 8 bytes of a snappy-java stream (SnappyCodec.MAGIC_HEADER): -126, "SNAPPY", 0.
SNAPPY_JAVA_MAGIC: Final = b"\x82SNAPPY\x00"

#: The full 16-byte stream header: magic, then big-endian int32 version 1 and minimum compatible
#: version 1 (SnappyCodec.DEFAULT_VERSION / MINIMUM_COMPATIBLE_VERSION).
SNAPPY_JAVA_HEADER: Final = SNAPPY_JAVA_MAGIC + struct.pack(">ii", 1, 1)

# java.util.zip.GZIPOutputStream's header (JDK 16 and later): no flags, MTIME 0, XFL 0, OS 255
# ("unknown"). zlib's own gzip wrapper differs only in the OS byte (3, "Unix"), and both emit the
# same DEFLATE body for the same level, so swapping these 10 bytes in reproduces the JVM's output.
_GZIP_HEADER: Final = bytes((0x1F, 0x8B, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xFF))
_ZLIB_GZIP_HEADER_LEN: Final = 10

_INT32 = struct.Struct(">I")

@dataclass(frozen=True)
class Codec:
    """One S3 compression format: how to encode an object body and how to name and label it.

    Attributes:
        name: canonical lower-case name used in this project's configuration.
        firehose_name: the ``CompressionFormat`` value Firehose's API uses for it.
        extension: appended to the object key ("" for none); ``FileExtension`` overrides it.
        content_encoding: the S3 ``Content-Encoding`` Firehose sets, or None for none.
    """

    name: str
    firehose_name: str
    extension: str
    content_encoding: str | None
    _compress: Callable[[memoryview, str], bytes] = field(repr=False, compare=False)
    _decompress: Callable[[memoryview], bytes] = field(repr=False, compare=False)

    def compress(self, data: BytesLike, entry_name: str = "") -> bytes:
        """Encode a whole object body and return the bytes to upload.

        ``data`` is read through a memoryview and never copied before compression, so callers can
        pass a slice of a larger buffer. The GIL is released while the bulk of the work runs, so
        this is meant to be called from a worker thread. ``entry_name`` is only used by ZIP: it
        names the archive's single entry (the object's file name without extension; "data" if
        empty). The result is a complete, self-contained object.
        """
        return self._compress(_byte_view(data), entry_name)

    def decompress(self, data: BytesLike) -> bytes:
        """Decode a whole object written in this format (the inverse of :meth:`compress`).

        Meant for tests and tools, not the delivery path. Raises ValueError when ``data`` is not a
        well-formed object of this format.
        """
        return self._decompress(_byte_view(data))


def _byte_view(data: BytesLike) -> memoryview:
    """Return a flat unsigned-byte view of ``data`` without copying it when that is possible."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    if view.c_contiguous:
        return view.cast("B")
    # A strided view has no contiguous bytes to hand to C code; one copy is unavoidable.
    return memoryview(view.tobytes())


# --- none -----------------------------------------------------------------------------------------


def _identity(view: memoryview, _entry_name: str = "") -> bytes:
    # Hand back the caller's own bytes object when the view covers all of it: uncompressed objects
    # can be 128 MiB and copying them buys nothing.
    if isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
        return view.obj
    return view.tobytes()


# --- gzip -----------------------------------------------------------------------------------------


def _gzip_compress(view: memoryview, _entry_name: str) -> bytes:
    # One zlib call for the whole object: zlib releases the GIL for the entire deflate and computes
    # the CRC-32 trailer in the same pass. Only the 10-byte header is then swapped for the JVM's.
    body = zlib.compress(view, DEFLATE_LEVEL, wbits=31)
    return _GZIP_HEADER + memoryview(body)[_ZLIB_GZIP_HEADER_LEN:]


def _gzip_decompress(view: memoryview) -> bytes:
    try:
        return gzip.decompress(view)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"not a valid gzip object: {exc}") from exc


# --- zip ------------------------------------------------------------------------------------------


def _zip_compress(view: memoryview, entry_name: str) -> bytes:
    now = datetime.now(UTC)
    info = zipfile.ZipInfo(
        entry_name or "data", date_time=(now.year, now.month, now.day, now.hour, now.minute, now.second)
    )
    info.compress_type = zipfile.ZIP_DEFLATED
    # "Made by" MS-DOS like java.util.zip.ZipOutputStream, so the archive does not depend on the
    # platform the daemon runs on; no Unix permission bits are recorded.
    info.create_system = 0
    sink = io.BytesIO()
    # zipfile deflates and CRCs the entry with zlib in single calls that release the GIL, and it
    # switches to ZIP64 records on its own when the entry exceeds 4 GiB.
    with zipfile.ZipFile(sink, mode="w") as archive:
        archive.writestr(info, view, compresslevel=DEFLATE_LEVEL)
    return sink.getvalue()


def _zip_decompress(view: memoryview) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(view)) as archive:
            entries = archive.infolist()
            if len(entries) != 1:
                raise ValueError(f"a ZIP object holds exactly one entry, found {len(entries)}")
            return archive.read(entries[0])
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ValueError(f"not a valid ZIP object: {exc}") from exc


# --- snappy (snappy-java stream) and hadoop_snappy ------------------------------------------------
#
# Raw blocks come from cramjam. python-snappy 0.7 is itself a thin layer over cramjam
# (snappy.compress is bytes(cramjam.snappy.compress_raw(...))), so calling cramjam directly adds
# nothing to install and saves a copy per block. cramjam releases the GIL while it compresses:
# on 8 MiB of JSON lines two threads reach ~1.75x the single-thread rate (~1.4 GB/s each) and a
# pure-Python thread keeps over 90% of its speed alongside. The encoder (the Rust snap
# crate) emitted the same blocks as the C++ libsnappy behind snappy-java 1.1.8 in our comparisons.


def _snappy_blocks(view: memoryview, header: bytes, block_size: int, *, hadoop: bool) -> bytes:
    """Compress ``view`` in fixed-size blocks, each framed with big-endian int32 lengths.

    snappy-java stream: ``header`` then per block ``<compressed length><raw snappy block>``.
    Hadoop framing (``hadoop=True``, empty header): per block ``<uncompressed length>
    <compressed length><raw snappy block>`` - one block per frame, which is what both Hadoop's
    BlockDecompressorStream and python-snappy's single-block-per-frame reader accept.
    """
    # Each block is compressed into a buffer cramjam allocates with the GIL released; the parts
    # are joined once. A preallocated output of the worst-case size was zero-filled with the GIL
    # held (a 5 MiB batch's buffer was ~6% of the event loop's GIL time under full ingest).
    parts: list[Any] = [header]
    pack = _INT32.pack
    for start in range(0, view.nbytes, block_size):
        block = view[start : start + block_size]
        raw = cramjam.snappy.compress_raw(block)
        if hadoop:
            parts.append(pack(block.nbytes))
        parts.append(pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _snappy_compress(view: memoryview, _entry_name: str) -> bytes:
    # SnappyOutputStream writes the header even for an empty stream (on close), so an empty body
    # becomes the bare 16-byte header, exactly as snappy-java produces it.
    return _snappy_blocks(view, SNAPPY_JAVA_HEADER, SNAPPY_BLOCK_SIZE, hadoop=False)


def _hadoop_snappy_compress(view: memoryview, _entry_name: str) -> bytes:
    # Hadoop framing has no stream header; an empty body is an empty object, which Hadoop's reader
    # treats as end of stream.
    return _snappy_blocks(view, b"", HADOOP_SNAPPY_BLOCK_SIZE, hadoop=True)


def _read_int32(view: memoryview, pos: int, what: str) -> int:
    if pos + 4 > view.nbytes:
        raise ValueError(f"truncated {what} at offset {pos}")
    value: int = _INT32.unpack_from(view, pos)[0]
    return value


def _raw_block(view: memoryview, pos: int, length: int) -> memoryview:
    if pos + length > view.nbytes:
        raise ValueError(f"truncated snappy block at offset {pos}: needs {length} bytes")
    try:
        return memoryview(cramjam.snappy.decompress_raw(view[pos : pos + length]))
    except cramjam.DecompressionError as exc:
        raise ValueError(f"corrupt snappy block at offset {pos}: {exc}") from exc


def _snappy_decompress(view: memoryview) -> bytes:
    if view[: len(SNAPPY_JAVA_MAGIC)].tobytes() != SNAPPY_JAVA_MAGIC:
        raise ValueError("not a snappy-java stream: missing the \\x82SNAPPY\\x00 magic header")
    parts: list[memoryview] = []
    pos = 0
    while pos < view.nbytes:
        # SnappyInputStream accepts concatenated streams: a header may follow any block.
        if view[pos : pos + len(SNAPPY_JAVA_MAGIC)].tobytes() == SNAPPY_JAVA_MAGIC:
            if pos + len(SNAPPY_JAVA_HEADER) > view.nbytes:
                raise ValueError(f"truncated snappy-java header at offset {pos}")
            pos += len(SNAPPY_JAVA_HEADER)
            continue
        length = _read_int32(view, pos, "block length")
        parts.append(_raw_block(view, pos + 4, length))
        pos += 4 + length
    return b"".join(parts)


def _hadoop_snappy_decompress(view: memoryview) -> bytes:
    parts: list[memoryview] = []
    pos = 0
    while pos < view.nbytes:
        # Hadoop's BlockCompressorStream may split one frame's uncompressed bytes over several
        # compressed blocks, so read blocks until the frame's announced length is reached.
        expected = _read_int32(view, pos, "frame length")
        pos += 4
        produced = 0
        while produced < expected:
            length = _read_int32(view, pos, "block length")
            block = _raw_block(view, pos + 4, length)
            parts.append(block)
            produced += block.nbytes
            pos += 4 + length
        if produced != expected:
            raise ValueError(f"Hadoop snappy frame announced {expected} bytes but holds {produced}")
    return b"".join(parts)


# --- registry -------------------------------------------------------------------------------------

_CODECS: Final[dict[str, Codec]] = {
    codec.name: codec
    for codec in (
        Codec("none", "UNCOMPRESSED", "", None, _identity, _identity),
        Codec("gzip", "GZIP", ".gz", "gzip", _gzip_compress, _gzip_decompress),
        Codec("zip", "ZIP", ".zip", "zip", _zip_compress, _zip_decompress),
        Codec("snappy", "Snappy", ".snappy", "snappy-java", _snappy_compress, _snappy_decompress),
        # Firehose's docs name the extension ".hsnappy", but objects it writes end in ".snappy".
        Codec(
            "hadoop_snappy",
            "HADOOP_SNAPPY",
            ".snappy",
            "hadoop-snappy",
            _hadoop_snappy_compress,
            _hadoop_snappy_decompress,
        ),
    )
}

#: Canonical codec names, in documentation order.
CODEC_NAMES: Final[tuple[str, ...]] = tuple(_CODECS)

_BY_ANY_NAME: Final[dict[str, Codec]] = {
    alias.lower(): codec for codec in _CODECS.values() for alias in (codec.name, codec.firehose_name)
}


def get_codec(name: str) -> Codec:
    """Return the codec for a canonical name or a Firehose ``CompressionFormat`` spelling.

    Matching ignores case, so "gzip", "GZIP", "Snappy", "HADOOP_SNAPPY", "UNCOMPRESSED" and "none"
    all resolve. (Firehose's own API is case-sensitive; enforcing that is the API layer's job.)
    Raises ValueError naming the known codecs for anything else.
    """
    codec = _BY_ANY_NAME.get(name.lower())
    if codec is None:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(CODEC_NAMES)}")
    return codec
