"""Tests for firehose.transforms.compression: every codec is read back by a reader that isn't ours.

* gzip: ``gzip.decompress`` and ``zlib``; zip: ``zipfile``.
* hadoop_snappy: python-snappy's Hadoop stream reader.
* snappy (snappy-java stream): the stream structure is walked byte by byte here, with each block
  decoded by a raw snappy decoder; and, where a JDK and Debian's ``libsnappy-java`` are installed,
  snappy-java's own ``SnappyInputStream`` reads our output and its ``SnappyOutputStream`` /
  ``SnappyHadoopCompatibleOutputStream`` output is compared with ours block by block.
"""

from __future__ import annotations

import array
import gzip
import io
import json
import os
import random
import shutil
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import cramjam
import pytest
import snappy
from snappy.snappy_formats import hadoop_stream_decompress

from firehose.transforms.compression import (
    CODEC_NAMES,
    DEFLATE_LEVEL,
    SNAPPY_BLOCK_SIZE,
    SNAPPY_JAVA_HEADER,
    get_codec,
)
from support import unavailable

BLOCK = 32 * 1024
MAGIC = bytes([0x82, 0x53, 0x4E, 0x41, 0x50, 0x50, 0x59, 0x00])  # 0x82 "SNAPPY" 0x00


def _json_lines(size: int, seed: int = 7) -> bytes:
    """Newline-delimited JSON records like a typical delivery stream carries."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        record = {
            "ts": 1714571709000 + rng.randrange(10**6),
            "user": f"u{rng.randrange(5000)}",
            "event": rng.choice(["click", "view", "purchase"]),
            "value": round(rng.random() * 100, 3),
        }
        out += json.dumps(record).encode() + b"\n"
    return bytes(out[:size])


def _mixed(size: int, seed: int = 11) -> bytes:
    """Incompressible random runs interleaved with highly repetitive ones."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(rng.randrange(1, 20_000))
        out += bytes([rng.randrange(256)]) * rng.randrange(1, 50_000)
    return bytes(out[:size])


CASES: dict[str, bytes] = {
    "empty": b"",
    "one-byte": b"x",
    "small": b'{"a":1}\n' * 10,
    "exactly-one-block": _json_lines(BLOCK),
    "one-block-plus-one": _json_lines(BLOCK + 1),
    "many-blocks-json": _json_lines(300_000),
    "many-blocks-mixed-1MiB": _mixed(1 << 20),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def payload(request: pytest.FixtureRequest) -> bytes:
    return CASES[request.param]


# --- independent structure readers (byte by byte, raw snappy blocks only) ---------------------------


def _walk_snappy_java(stream: bytes) -> list[bytes]:
    """Check the snappy-java stream layout and return each block's decompressed bytes."""
    assert stream[0:8] == MAGIC
    assert stream[8:12] == b"\x00\x00\x00\x01"  # version 1, big-endian
    assert stream[12:16] == b"\x00\x00\x00\x01"  # minimum compatible version 1
    blocks = []
    pos = 16
    while pos < len(stream):
        (length,) = struct.unpack(">i", stream[pos : pos + 4])
        assert 0 < length <= len(stream) - pos - 4
        raw = stream[pos + 4 : pos + 4 + length]
        block = bytes(cramjam.snappy.decompress_raw(raw))
        assert snappy.uncompress(raw) == block  # a second raw decoder agrees
        blocks.append(block)
        pos += 4 + length
    assert pos == len(stream)
    return blocks


def _walk_hadoop(stream: bytes) -> list[bytes]:
    """Check the Hadoop framing (one block per frame) and return each frame's bytes."""
    frames = []
    pos = 0
    while pos < len(stream):
        uncompressed, compressed = struct.unpack(">ii", stream[pos : pos + 8])
        raw = stream[pos + 8 : pos + 8 + compressed]
        assert len(raw) == compressed
        block = bytes(cramjam.snappy.decompress_raw(raw))
        assert len(block) == uncompressed
        frames.append(block)
        pos += 8 + compressed
    return frames


def _expected_blocks(data: bytes, size: int = BLOCK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# --- round trips through independent readers -------------------------------------------------------


def test_none_returns_input_unchanged(payload: bytes) -> None:
    codec = get_codec("none")
    assert codec.compress(payload) == payload
    assert codec.compress(payload) is payload  # no copy of a whole bytes object
    assert codec.compress(memoryview(payload)) == payload
    assert codec.decompress(payload) == payload


def test_gzip_is_one_member_read_by_gzip_and_zlib(payload: bytes) -> None:
    out = get_codec("gzip").compress(payload)
    assert gzip.decompress(out) == payload
    stream = zlib.decompressobj(wbits=31)
    assert stream.decompress(out) == payload
    assert stream.eof and stream.unused_data == b""  # exactly one member, nothing after it
    # java.util.zip.GZIPOutputStream's header: no flags, no mtime, XFL 0, OS 255.
    assert out[:10] == bytes.fromhex("1f8b08000000000000ff")
    assert out[-8:] == struct.pack("<II", zlib.crc32(payload), len(payload))
    # The DEFLATE body is zlib's at the module's level.
    assert out[10:-8] == zlib.compress(payload, DEFLATE_LEVEL, wbits=-15)


def test_zip_has_exactly_one_deflate_entry(payload: bytes) -> None:
    out = get_codec("zip").compress(payload, "mystream-1-2024-05-01-13-55-09-abc")
    with zipfile.ZipFile(io.BytesIO(out)) as archive:
        assert archive.testzip() is None
        (entry,) = archive.infolist()
        assert entry.filename == "mystream-1-2024-05-01-13-55-09-abc"
        assert entry.compress_type == zipfile.ZIP_DEFLATED
        assert entry.file_size == len(payload)
        assert archive.read(entry) == payload


def test_zip_entry_defaults_to_data() -> None:
    with zipfile.ZipFile(io.BytesIO(get_codec("zip").compress(b"abc"))) as archive:
        assert archive.namelist() == ["data"]


def test_hadoop_snappy_read_by_python_snappy(payload: bytes) -> None:
    out = get_codec("hadoop_snappy").compress(payload)
    sink = io.BytesIO()
    hadoop_stream_decompress(io.BytesIO(out), sink)
    assert sink.getvalue() == payload
    assert snappy.HadoopStreamDecompressor().decompress(out) == payload


def test_hadoop_snappy_framing_is_32k_frames_of_one_block(payload: bytes) -> None:
    out = get_codec("hadoop_snappy").compress(payload)
    assert _walk_hadoop(out) == _expected_blocks(payload)
    if not payload:
        assert out == b""


def test_snappy_java_stream_layout(payload: bytes) -> None:
    out = get_codec("snappy").compress(payload)
    assert out[:16] == SNAPPY_JAVA_HEADER == MAGIC + b"\x00\x00\x00\x01\x00\x00\x00\x01"
    assert _walk_snappy_java(out) == _expected_blocks(payload, SNAPPY_BLOCK_SIZE)
    if not payload:
        assert out == SNAPPY_JAVA_HEADER  # SnappyOutputStream writes the header even when empty


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_own_decompress_inverts_compress(name: str, payload: bytes) -> None:
    codec = get_codec(name)
    assert codec.decompress(codec.compress(payload, "entry")) == payload


# --- inputs other than bytes -----------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_memoryview_slices_and_bytearrays_are_accepted(name: str) -> None:
    data = _mixed(200_000)
    codec = get_codec(name)
    backing = bytearray(b"HEAD" + data + b"TAIL")
    view = memoryview(backing)[4:-4]
    assert codec.decompress(codec.compress(view)) == data
    assert codec.decompress(codec.compress(bytearray(data))) == data
    assert backing == b"HEAD" + data + b"TAIL"  # input untouched


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_non_byte_buffers_are_read_as_raw_bytes(name: str) -> None:
    words = array.array("I", range(10_000))
    codec = get_codec(name)
    assert codec.decompress(codec.compress(words)) == words.tobytes()  # type: ignore[arg-type]


def test_concatenated_snappy_java_streams_decode_like_snappy_input_stream() -> None:
    codec = get_codec("snappy")
    assert codec.decompress(codec.compress(b"first ") + codec.compress(b"second")) == b"first second"


# --- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("gzip", b"not gzip at all"),
        ("zip", b"PK\x03\x04 truncated"),
        ("snappy", b"\x00\x00\x00\x05hello"),  # no magic header
        ("snappy", SNAPPY_JAVA_HEADER + b"\x00\x00\x00\x40abc"),  # block longer than the data
        ("snappy", SNAPPY_JAVA_HEADER + b"\x00\x00"),  # truncated length
        ("hadoop_snappy", b"\x00\x00\x00\x10\x00\x00\x00\x02\xff\xff"),  # corrupt block
        ("hadoop_snappy", b"\x00\x00\x00\x10"),  # frame without its block
    ],
)
def test_decompress_rejects_malformed_objects(name: str, data: bytes) -> None:
    with pytest.raises(ValueError):
        get_codec(name).decompress(data)


def test_zip_decompress_insists_on_one_entry() -> None:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("a", b"1")
        archive.writestr("b", b"2")
    with pytest.raises(ValueError, match="exactly one entry"):
        get_codec("zip").decompress(sink.getvalue())


# --- names, extensions, content encodings ----------------------------------------------------------


def test_codec_names() -> None:
    assert CODEC_NAMES == ("none", "gzip", "zip", "snappy", "hadoop_snappy")


@pytest.mark.parametrize(
    ("name", "firehose_name", "extension", "content_encoding"),
    [
        ("none", "UNCOMPRESSED", "", None),
        ("gzip", "GZIP", ".gz", "gzip"),
        ("zip", "ZIP", ".zip", "zip"),
        ("snappy", "Snappy", ".snappy", "snappy-java"),
        ("hadoop_snappy", "HADOOP_SNAPPY", ".snappy", "hadoop-snappy"),
    ],
)
def test_codec_metadata(name: str, firehose_name: str, extension: str, content_encoding: str | None) -> None:
    codec = get_codec(name)
    assert (codec.name, codec.firehose_name, codec.extension, codec.content_encoding) == (
        name,
        firehose_name,
        extension,
        content_encoding,
    )


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("UNCOMPRESSED", "none"),
        ("uncompressed", "none"),
        ("none", "none"),
        ("NONE", "none"),
        ("GZIP", "gzip"),
        ("gzip", "gzip"),
        ("ZIP", "zip"),
        ("Snappy", "snappy"),
        ("SNAPPY", "snappy"),
        ("snappy", "snappy"),
        ("HADOOP_SNAPPY", "hadoop_snappy"),
        ("hadoop_snappy", "hadoop_snappy"),
        ("Hadoop_Snappy", "hadoop_snappy"),
    ],
)
def test_get_codec_accepts_canonical_and_firehose_spellings(spelling: str, name: str) -> None:
    assert get_codec(spelling).name == name


@pytest.mark.parametrize("bad", ["x", "", "lz4", "hadoop-snappy", "gzip "])
def test_get_codec_unknown_name(bad: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        get_codec(bad)
    assert str(excinfo.value) == f"unknown compression {bad!r}; known: none, gzip, zip, snappy, hadoop_snappy"


# --- snappy-java itself as the reader (optional: needs a JDK and Debian's libsnappy-java) ---------

_JAVA_TOOL = """
import java.io.*;
import java.nio.file.*;
import org.xerial.snappy.*;

/** args: mode (read | write | hwrite), then pairs of input and output files. */
public class SnappyJavaTool {
    public static void main(String[] args) throws IOException {
        for (int i = 1; i < args.length; i += 2) {
            byte[] in = Files.readAllBytes(Paths.get(args[i]));
            ByteArrayOutputStream sink = new ByteArrayOutputStream();
            if (args[0].equals("read")) {
                try (InputStream s = new SnappyInputStream(new ByteArrayInputStream(in))) { s.transferTo(sink); }
            } else {
                OutputStream s = args[0].equals("write")
                    ? new SnappyOutputStream(sink) : new SnappyHadoopCompatibleOutputStream(sink);
                s.write(in);
                s.close();
            }
            Files.write(Paths.get(args[i + 1]), sink.toByteArray());
        }
    }
}
"""


def _snappy_java_jar() -> Path | None:
    candidates = [os.environ.get("SNAPPY_JAVA_JAR", ""), "/usr/share/java/snappy-java.jar"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="module")
def snappy_java(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, list[bytes]], list[bytes]]:
    """Run snappy-java over several inputs in one JVM; skip when it isn't installed."""
    jar = _snappy_java_jar()
    if jar is None or not shutil.which("javac") or not shutil.which("java"):
        unavailable("snappy-java not available (apt-get install default-jdk-headless libsnappy-java)")
    workdir = tmp_path_factory.mktemp("snappy-java")
    (workdir / "SnappyJavaTool.java").write_text(_JAVA_TOOL)
    subprocess.run(
        ["javac", "-cp", str(jar), "-d", str(workdir), str(workdir / "SnappyJavaTool.java")], check=True
    )

    def run(mode: str, inputs: list[bytes]) -> list[bytes]:
        args = []
        for i, data in enumerate(inputs):
            source, target = workdir / f"{mode}-{i}.in", workdir / f"{mode}-{i}.out"
            source.write_bytes(data)
            args += [str(source), str(target)]
        classpath = f"{workdir}{os.pathsep}{jar}"
        subprocess.run(["java", "-cp", classpath, "SnappyJavaTool", mode, *args], check=True, timeout=120)
        return [(workdir / f"{mode}-{i}.out").read_bytes() for i in range(len(inputs))]

    return run


def test_snappy_input_stream_reads_our_objects(
    snappy_java: Callable[[str, list[bytes]], list[bytes]],
) -> None:
    codec = get_codec("snappy")
    inputs = list(CASES.values())
    assert snappy_java("read", [codec.compress(data) for data in inputs]) == inputs


def test_snappy_output_stream_frames_like_ours(
    snappy_java: Callable[[str, list[bytes]], list[bytes]],
) -> None:
    # Same header and the same block boundaries as SnappyOutputStream. (With this machine's
    # libsnappy the bytes are identical too, but raw block encodings may legitimately differ
    # between snappy versions, so that is not asserted.)
    inputs = list(CASES.values())
    codec = get_codec("snappy")
    for data, theirs in zip(inputs, snappy_java("write", inputs), strict=True):
        ours = codec.compress(data)
        assert theirs[:16] == ours[:16]
        assert _walk_snappy_java(theirs) == _walk_snappy_java(ours) == _expected_blocks(data)


def test_hadoop_compatible_output_stream_frames_like_ours(
    snappy_java: Callable[[str, list[bytes]], list[bytes]],
) -> None:
    inputs = list(CASES.values())
    codec = get_codec("hadoop_snappy")
    for data, theirs in zip(inputs, snappy_java("hwrite", inputs), strict=True):
        assert _walk_hadoop(theirs) == _walk_hadoop(codec.compress(data)) == _expected_blocks(data)
