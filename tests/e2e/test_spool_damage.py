"""A damaged spool as an operator meets it: the stream whose acknowledged records are damaged
refuses to start while the others run, health names it without paths, `firehose spool check`
says where the damage is, `firehose spool salvage` keeps every frame that verifies, and a reload
brings the stream back with every record that survived."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

import orjson

from support import Daemon, daemon_config, local_objects, raw_call, stream_config, wait_for


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firehose", *args], capture_output=True, text=True, timeout=120)


def _records_frames(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    # After the header: 12 bytes, and from format version 3 on the CRC key twice (u32).
    pos, out = (20 if struct.unpack_from(">H", data, 8)[0] >= 3 else 12), []
    while pos + 9 <= len(data):
        length, _crc, ftype = struct.unpack_from(">IIB", data, pos)
        if ftype == 1:
            out.append((pos, length))
        pos += 9 + length
    return out


def test_a_damaged_stream_waits_for_salvage_while_the_others_run(tmp_path: Path) -> None:
    streams = [stream_config(n, {"type": "local", "path": str(tmp_path / f"out-{n}")},
                             buffering={"size_mib": 1, "interval_secs": 900}) for n in ("a", "b")]
    cfg = daemon_config(tmp_path, streams)
    d = Daemon(tmp_path, cfg).start()
    fh = d.firehose()
    for i in range(20):
        fh.put_record(DeliveryStreamName="a", Record={"Data": orjson.dumps({"i": i}) + b"\n"})
    d.kill9()  # nothing delivered yet: every record is only in the spool

    [seg] = sorted((tmp_path / "data" / "spool" / "a").glob("seg-*.log"))
    offset, length = _records_frames(seg)[5]
    data = bytearray(seg.read_bytes())
    data[offset + 9 + length // 2] ^= 0xFF
    seg.write_bytes(bytes(data))

    d.start()
    try:
        status, body = raw_call(d.port, "PutRecord", orjson.dumps(
            {"DeliveryStreamName": "b", "Record": {"Data": "Yg=="}}))
        assert status == 200, body
        status, body = raw_call(d.port, "PutRecord", orjson.dumps(
            {"DeliveryStreamName": "a", "Record": {"Data": "YQ=="}}))
        assert (status, body["__type"]) == (503, "ServiceUnavailableException")
        health = d.health()
        assert health["status"] == "degraded" and health["streams"]["a"]["status"] == "failed"
        assert str(tmp_path) not in orjson.dumps(health).decode()
        failed = [e for e in d.events() if e.get("event") == "stream_start_failed"]
        assert failed and seg.name in failed[0]["reason"] and f"offset {offset}" in failed[0]["reason"]

        check = _cli("spool", "check", str(tmp_path / "data"))
        assert check.returncode == 1, check.stdout + check.stderr
        assert f"at offset {offset}" in check.stdout and "below the durable mark" in check.stdout
        salvage = _cli("spool", "salvage", str(tmp_path / "data" / "spool" / "a"))
        assert salvage.returncode == 0, salvage.stderr
        assert "1 record(s) lost" in salvage.stdout and "sequence numbers 5..5" in salvage.stdout
        assert _cli("spool", "check", str(tmp_path / "data")).returncode == 0

        d.signal(signal.SIGHUP)  # a reload starts streams that failed to start
        wait_for(lambda: d.health()["streams"]["a"].get("status") == "ok", 30, "stream a back")
    finally:
        assert d.stop() == 0
    delivered = sorted(orjson.loads(line)["i"] for v in local_objects(tmp_path / "out-a").values()
                       for line in v.splitlines())
    assert delivered == [i for i in range(20) if i != 5]


def test_one_daemon_per_data_dir_and_no_salvage_beside_a_running_daemon(tmp_path: Path) -> None:
    """A second daemon on the same data_dir, or a salvage of a spool a daemon is writing, would
    write beside it: both are refused with one line naming the holder's pid."""
    stream = stream_config("a", {"type": "local", "path": str(tmp_path / "out")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        d.firehose().put_record(DeliveryStreamName="a", Record={"Data": b"kept\n"})
        second = tmp_path / "second"
        second.mkdir()
        other = Daemon(second, {**daemon_config(tmp_path, [stream]), "data_dir": str(tmp_path / "data")})
        res = subprocess.run(other.command, capture_output=True, text=True, timeout=60, cwd=second)
        pid = d.proc.pid
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip() == (f"firehose: cannot start: {tmp_path / 'data'}: the data_dir is in use by "
                                      f"another process (pid {pid})")
        salvage = _cli("spool", "salvage", str(tmp_path / "data" / "spool" / "a"))
        assert salvage.returncode == 2
        assert salvage.stderr.strip() == (f"firehose: {tmp_path / 'data' / 'spool' / 'a'}: the spool is in use by "
                                          f"another process (pid {pid}); stop the daemon first")
        assert d.health()["streams"]["a"]["status"] == "ok"  # the running daemon is untouched
    finally:
        assert d.stop() == 0
    assert local_objects(tmp_path / "out") and b"kept" in b"".join(local_objects(tmp_path / "out").values())


def test_spool_tools_on_a_damaged_header_and_on_a_newer_format(tmp_path: Path) -> None:
    import asyncio

    from firehose.spool import Spool

    async def write(spool_dir: Path) -> None:
        sp = Spool(str(spool_dir))
        sp.open()
        for i in range(5):
            sp.append_records([b"r%d" % i], 1000)
            await sp.wait_durable()
        await sp.aclose()
    spool_dir, other = tmp_path / "spool" / "a", tmp_path / "spool" / "b"
    asyncio.run(write(spool_dir))
    asyncio.run(write(other))
    [seg] = sorted(spool_dir.glob("seg-*.log"))
    data = bytearray(seg.read_bytes())
    data[17] ^= 0x01  # the second copy of the segment's CRC key
    seg.write_bytes(bytes(data))
    check = _cli("spool", "check", str(spool_dir))
    assert check.returncode == 1
    assert f"{seg}: 20 damaged bytes at offset 0, the segment header" in check.stdout and "no record" in check.stdout
    salvage = _cli("spool", "salvage", str(spool_dir))
    assert salvage.returncode == 0 and "0 record(s) lost" in salvage.stdout, salvage.stdout + salvage.stderr
    assert _cli("spool", "check", str(spool_dir)).returncode == 0

    data = bytearray(seg.read_bytes())
    data[9] = 9  # format version 9
    seg.write_bytes(bytes(data))
    [other_seg] = sorted(other.glob("seg-*.log"))
    offset, length = _records_frames(other_seg)[2]
    damaged = bytearray(other_seg.read_bytes())
    damaged[offset + 9 + length - 1] ^= 0x01
    other_seg.write_bytes(bytes(damaged))
    for tool in ("check", "salvage"):  # the newer spool is left alone; the other one is not
        res = _cli("spool", tool, str(tmp_path / "spool"))
        assert res.returncode == 2, res.stdout + res.stderr
        [line] = res.stderr.splitlines()
        assert f"{seg}: spool format version 9 was written by a newer firehose" in line and "changes nothing" in line
        assert str(other) in res.stdout and "record" in res.stdout, res.stdout
    assert seg.read_bytes() == bytes(data)
    assert _cli("spool", "check", str(other)).returncode == 0  # salvaged
