"""The file tailing source through the daemon subprocess: logrotate-style rotation while a writer
keeps writing (rename-and-create, copytruncate, delete), kill -9, reload, bad files; every line
exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from support import Daemon, daemon_config, local_objects, stream_config, wait_for

FAST = {"poll_interval_ms": 10, "discovery_interval_ms": 50, "close_inactive_ms": 300, "multi_line_timeout_ms": 200}


def file_stream(tmp: Path, paths: list[str], **source: Any) -> dict[str, Any]:
    src = {"type": "file", "paths": paths, "initial_position": "start_of_file", **FAST, **source}
    return stream_config("logs", {"type": "local", "path": str(tmp / "out"), "prefix": "x/"},
                         buffering={"size_mib": 1, "interval_secs": 1}, sources=[src])


def delivered_lines(tmp: Path) -> Counter[bytes]:
    return Counter(line for body in local_objects(tmp / "out").values() for line in body.splitlines())


class Writer:
    """Appends numbered lines to a log file from a thread; ``rotate`` runs with writes paused,
    as a logger that reopens its file after logrotate's signal would see it."""

    def __init__(self, path: Path, tag: str, pause: float = 0.0005) -> None:
        self.path, self.tag, self.pause = path, tag, pause
        self.written = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - kept open across writes, as a logger does
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                self._f.write(f"{self.tag}-{self.written:06d} " + "x" * 80 + "\n")
                self.written += 1
            time.sleep(self.pause)

    def reopen(self) -> None:
        """The logger's reaction to rename-and-create rotation: write to a new file at the name."""
        self._f.close()
        self._f = open(self.path, "a", buffering=1)  # noqa: SIM115

    def start(self) -> Writer:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        self._f.close()
        return self.written

    def expected(self) -> set[bytes]:
        return {f"{self.tag}-{i:06d} ".encode() + b"x" * 80 for i in range(self.written)}


def assert_exactly_once(tmp: Path, expected: set[bytes]) -> None:
    got = delivered_lines(tmp)
    twice = [k for k, v in got.items() if v > 1]
    assert not twice, f"{len(twice)} lines delivered twice, e.g. {twice[:3]}"
    missing = expected - set(got)
    assert not missing, f"{len(missing)} lines missing, e.g. {sorted(missing)[:3]}"
    assert set(got) == expected


@pytest.mark.parametrize("mode", ["rename", "copytruncate", "delete"])
def test_rotation_while_a_writer_keeps_writing_delivers_every_line_once(tmp_path: Path, mode: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    # rename and copytruncate keep rotated files under names the glob matches (as logrotate's
    # app.log.1); delete mode matches the live name only.
    pattern = str(logs / "app.log*") if mode != "delete" else str(log)
    d = Daemon(tmp_path, daemon_config(tmp_path, [file_stream(tmp_path, [pattern])])).start()
    writer = Writer(log, mode).start()
    try:
        for generation in range(3):
            time.sleep(0.4)
            with writer.lock:
                if mode == "rename":
                    os.rename(log, logs / f"app.log.{generation + 1}")
                    writer.reopen()
                elif mode == "copytruncate":
                    shutil.copyfile(log, logs / f"app.log.{generation + 1}")
                    os.truncate(log, 0)
                else:
                    os.unlink(log)
                    writer.reopen()
        time.sleep(0.4)
        writer.stop()
        expected = writer.expected()
        wait_for(lambda: set(delivered_lines(tmp_path)) >= expected, 60, "every line")
        time.sleep(1.2)  # anything that would come twice has come by now
    finally:
        writer.stop() if not writer._stop.is_set() else None
        assert d.stop() == 0
    assert writer.written > 300
    assert_exactly_once(tmp_path, expected)


def test_kill9_while_tailing_resumes_from_the_spool_without_gaps_or_duplicates(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    d = Daemon(tmp_path, daemon_config(tmp_path, [file_stream(tmp_path, [str(logs / "*.log")])]))
    writer = Writer(logs / "a.log", "k").start()
    try:
        for _ in range(3):
            d.start()
            time.sleep(0.7)
            d.kill9()
        d.start()
        time.sleep(0.3)
        writer.stop()
        expected = writer.expected()
        wait_for(lambda: set(delivered_lines(tmp_path)) >= expected, 60, "every line")
        time.sleep(1.2)
    finally:
        if not writer._stop.is_set():
            writer.stop()
        assert d.stop() == 0
    assert_exactly_once(tmp_path, expected)
    assert not (tmp_path / "var").exists() and not list(tmp_path.glob("**/checkpoints*"))


def test_reload_adds_a_path_and_keeps_the_positions_of_the_others(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_text("".join(f"a{i}\n" for i in range(100)))
    (logs / "b.txt").write_text("".join(f"b{i}\n" for i in range(50)))
    config = daemon_config(tmp_path, [file_stream(tmp_path, [str(logs / "*.log")])])
    d = Daemon(tmp_path, config).start()
    try:
        wait_for(lambda: len(delivered_lines(tmp_path)) == 100, 30, "a.log")
        d.write_config({**config, "streams": [file_stream(tmp_path, [str(logs / "*.log"), str(logs / "*.txt")])]})
        d.signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "config_reloaded" for e in d.events()), 30, "the reload")
        with open(logs / "a.log", "a") as f:
            f.write("a100\n")
        wait_for(lambda: len(delivered_lines(tmp_path)) == 151, 30, "b.txt and the new line of a.log")
        time.sleep(1.2)
    finally:
        assert d.stop() == 0
    got = delivered_lines(tmp_path)
    assert max(got.values()) == 1
    assert set(got) == {f"a{i}".encode() for i in range(101)} | {f"b{i}".encode() for i in range(50)}


def test_a_bad_file_is_reported_and_the_others_keep_flowing(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    os.symlink(logs / "missing-target", logs / "broken.log")  # matched, but cannot be opened
    (logs / "garbage.log").write_bytes(b"\xff\xfe\x00binary\x80\n127.0.0.1 - - [07/Mar/2004:16:10:02 -0800] "
                                       b"\"GET /x HTTP/1.1\" 200 6291\n")
    (logs / "good.log").write_text("fine\n")
    stream = file_stream(tmp_path, [str(logs / "*.log")],
                         processing=[{"type": "log_to_json", "log_format": "common_apache_log"}])
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        wait_for(lambda: len(delivered_lines(tmp_path)) == 3, 30, "three records")
        metrics = d.metrics_text()
    finally:
        assert d.stop() == 0
    got = delivered_lines(tmp_path)
    assert b"\xff\xfe\x00binary\x80" in got  # not convertible: sent as read, not dropped
    assert b"fine" in got
    assert any(line.startswith(b'{"host":"127.0.0.1"') for line in got)
    events = [e for e in d.events() if e.get("event") == "file_source_error"]
    assert {e["reason"] for e in events} >= {"stat", "conversion"}
    assert 'firehose_FileSourceErrors_total{DeliveryStreamName="logs",reason="stat"}' in metrics
    assert 'firehose_FileSourceUnconverted_total{DeliveryStreamName="logs"} 2.0' in metrics


def test_many_files_and_a_backlog_larger_than_the_spool_stay_bounded(tmp_path: Path) -> None:
    """300 files holding 150 MiB, read from their start into a 32 MiB spool: the reader waits for
    room instead of buffering, memory stays flat, every line arrives once."""
    import psutil

    logs = tmp_path / "logs"
    logs.mkdir()
    line = b"y" * 1000
    for n in range(300):
        (logs / f"f{n:03d}.log").write_bytes(b"".join(b"%03d-%04d " % (n, i) + line + b"\n" for i in range(500)))
    stream = file_stream(tmp_path, [str(logs / "*.log")], discovery_interval_ms=1000)
    stream["spool"] = {"max_size_mib": 32, "segment_size_mib": 4}
    stream["delivery"] = {"retry_initial_backoff_ms": 100, "retry_max_backoff_ms": 300}
    (tmp_path / "out").write_text("not a directory: deliveries fail until this is removed")
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    base = proc.memory_info().rss
    peak = base
    try:
        wait_for(lambda: any(e.get("event") == "file_source_paused" for e in d.events()), 60, "a full spool")
        peak = max(peak, proc.memory_info().rss)
        (tmp_path / "out").unlink()  # the destination is back
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            peak = max(peak, proc.memory_info().rss)
            if sum(len(b) for b in local_objects(tmp_path / "out").values()) >= 300 * 500 * 1010:
                break
            time.sleep(0.1)
        time.sleep(1.2)
        resumed = any(e.get("event") == "file_source_resumed" for e in d.events())
    finally:
        assert d.stop() == 0
    got = delivered_lines(tmp_path)
    assert len(got) == 300 * 500 and max(got.values()) == 1
    growth = (peak - base) >> 20
    assert resumed
    print(f"RSS +{growth} MiB reading 300 files / 150 MiB through a 32 MiB spool")
    assert growth < 120, f"RSS grew by {growth} MiB"


def test_a_stream_with_file_sources_still_takes_direct_put_and_backs_up_source_records(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_text("  padded line  \n")
    stream = file_stream(tmp_path, [str(logs / "*.log")], processing=[{"type": "single_line"}])
    stream["backup"] = {"path": str(tmp_path / "backup"), "mode": "all"}
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        d.firehose().put_record(DeliveryStreamName="logs", Record={"Data": b"direct\n"})
        wait_for(lambda: len(delivered_lines(tmp_path)) == 2, 30, "both records")
        wait_for(lambda: len(local_objects(tmp_path / "backup")) >= 1, 30, "the backup")
    finally:
        assert d.stop() == 0
    assert set(delivered_lines(tmp_path)) == {b"padded line", b"direct"}
    backed_up = {line for body in local_objects(tmp_path / "backup").values() for line in body.splitlines()}
    assert backed_up == {b"padded line", b"direct"}  # as the source produced them: after single_line


def wait_written(writer: Writer, more: int) -> int:
    """Wait until ``writer`` has written ``more`` lines beyond what it had written now."""
    target = writer.written + more
    wait_for(lambda: writer.written >= target, 30, f"{more} more lines")
    return writer.written


def daemon_holds(d: Daemon, path: Path) -> bool:
    """Whether the daemon has a descriptor open on ``path``."""
    assert d.proc is not None
    fds = Path(f"/proc/{d.proc.pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == os.path.realpath(path):
                return True
        except OSError:
            continue
    return False


def rotated_file_released(d: Daemon, size: int) -> bool:
    """Whether the file found renamed was read to its end (``size``) and released."""
    events = d.events()
    found = any(e.get("event") == "file_source_rotated_file_found" for e in events)
    return found and any(e.get("event") == "file_source_released" and e.get("offset") == size for e in events)


def test_a_file_rotated_while_the_daemon_was_killed_is_read_to_its_end(tmp_path: Path) -> None:
    """``paths`` names the live file only: the renamed file no longer matches it, yet what was
    written to it after the last checkpoint (before and after the rename) is delivered once."""
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    d = Daemon(tmp_path, daemon_config(tmp_path, [file_stream(tmp_path, [str(log)])])).start()
    writer = Writer(log, "r").start()
    try:
        wait_for(lambda: len(delivered_lines(tmp_path)) >= 200, 30, "lines before the crash")
        d.kill9()
        at_kill = writer.written
        wait_written(writer, 200)  # written while down, before the rotation
        with writer.lock:
            os.rename(log, logs / "app.log.1")
            at_rename = writer.written
        wait_written(writer, 200)  # the logger's last lines, into the renamed file
        with writer.lock:
            writer.reopen()
            at_reopen = writer.written
            rotated_size = (logs / "app.log.1").stat().st_size
        wait_written(writer, 200)  # the new file at the live name
        d.start()
        wait_written(writer, 200)
        writer.stop()
        expected = writer.expected()
        wait_for(lambda: set(delivered_lines(tmp_path)) >= expected, 60, "every line")
        wait_for(lambda: rotated_file_released(d, rotated_size), 30, "the rotated file read to its end")
    finally:
        if not writer._stop.is_set():
            writer.stop()
        assert d.stop() == 0  # flushes what is buffered: a line read twice would be delivered twice
    assert at_rename - at_kill >= 200 and at_reopen - at_rename >= 200
    assert_exactly_once(tmp_path, expected)
    assert not any(e.get("event") == "file_source_rotated_file_lost" for e in d.events())


def test_a_file_rotated_while_its_descriptor_was_closed_is_read_to_its_end(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    numbered = [f"c-{i:06d} ".encode() + b"x" * 80 for i in range(400)]
    with open(log, "ab") as f:
        f.write(b"".join(line + b"\n" for line in numbered[:100]))
    d = Daemon(tmp_path, daemon_config(tmp_path, [file_stream(tmp_path, [str(log)])])).start()  # close_inactive_ms=300
    try:
        wait_for(lambda: len(delivered_lines(tmp_path)) == 100, 30, "the first lines")
        wait_for(lambda: not daemon_holds(d, log), 30, "the idle file's descriptor closed")
        with open(log, "ab", buffering=0) as f:  # the logger's handle
            f.write(b"".join(line + b"\n" for line in numbered[100:200]))  # just before the rotation
            os.rename(log, logs / "app.log.1")
            f.write(b"".join(line + b"\n" for line in numbered[200:300]))  # after it, before the reopen
        with open(log, "ab") as f:
            f.write(b"".join(line + b"\n" for line in numbered[300:]))
        wait_for(lambda: set(delivered_lines(tmp_path)) >= set(numbered), 60, "every line")
        wait_for(lambda: rotated_file_released(d, 300 * len(numbered[0] + b"\n")), 30, "the rotated file released")
    finally:
        assert d.stop() == 0
    assert_exactly_once(tmp_path, set(numbered))
