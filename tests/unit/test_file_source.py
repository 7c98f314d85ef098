"""The file source's reading rules against real files, with an in-memory sink standing in for
the stream's spool: partial lines, multi-line records across reads, cut lines, header lines,
initial position, positions and back-pressure."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from firehose.config import ConfigError, load_config_text
from firehose.interfaces import BuildContext
from firehose.metrics import Metrics
from firehose.sources.file import FileSource, FileSourceConfig, IdentitySearch, SearchStep, matched_by
from firehose.sources.file_position import FollowedFile
from firehose.sources.file_records import RecordSplitter
from support import settle


class MemorySink:
    """What a source writes into, kept in memory: records in order and merged positions."""

    def __init__(self, positions: dict[str, Any] | None = None) -> None:
        self.metrics = Metrics()
        self.records: list[bytes] = []
        self.positions: dict[str, Any] = dict(positions or {})
        self.room = True
        self.accepting = True

    def has_room(self, nbytes: int) -> bool:
        return self.room

    async def put(self, records: list[bytes], arrival_ms: int | None = None, *, nbytes: int | None = None,
                  meta: list[Any] | None = None, positions: dict[str, Any] | None = None) -> int:
        self.records.extend(records)
        self.positions.update(positions or {})
        return len(self.records)


def source(paths: list[str], sink: MemorySink, **options: Any) -> FileSource:
    config = FileSourceConfig.model_validate({
        "type": "file", "paths": paths, "initial_position": "start_of_file", "poll_interval_ms": 10,
        "discovery_interval_ms": 20, "multi_line_timeout_ms": 150, "close_inactive_ms": 100, **options})
    ctx = BuildContext("logs", 1, "us-east-1", "000000000000", "/tmp", structlog.get_logger())
    return FileSource(config, ctx, sink)  # type: ignore[arg-type]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"one\ntw")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink)
        await src.start()
        await settle(lambda: sink.records == [b"one\n"])
        await asyncio.sleep(0.2)
        assert sink.records == [b"one\n"]  # "tw" has no newline yet
        with open(log, "ab") as f:
            f.write(b"o\nthree\n")
        await settle(lambda: sink.records == [b"one\n", b"two\n", b"three\n"])
        await src.stop()

    run(go())
    (pos,) = [v for k, v in sink.positions.items() if k.startswith("file/") and isinstance(v, dict)]
    assert pos["offset"] == log.stat().st_size and pos["path"] == str(log)


def test_multi_line_records_are_assembled_across_reads(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"2024-05-01 first\n  at frame 1\n")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink, multi_line_start_pattern=r"^\d{4}-")
        await src.start()
        await asyncio.sleep(0.05)
        with open(log, "ab") as f:
            f.write(b"  at frame 2\n2024-05-01 second\n")
        await settle(lambda: len(sink.records) == 1)
        assert sink.records == [b"2024-05-01 first\n  at frame 1\n  at frame 2\n"]
        # The last record has no successor yet: it goes once the file is quiet.
        await settle(lambda: len(sink.records) == 2)
        assert sink.records[1] == b"2024-05-01 second\n"
        await src.stop()

    run(go())


def test_a_multi_line_record_outgrowing_the_limit_is_cut_and_its_tail_skipped(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"2024-05-01 one\n" + b"  at frame\n" * 10)  # 125 bytes: over the 64-byte limit
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink, multi_line_start_pattern=r"^\d{4}-", max_record_bytes=64)
        await src.start()
        await settle(lambda: len(sink.records) == 1)
        with open(log, "ab") as f:  # more of the same record, then the next one
            f.write(b"  at frame\n" * 3 + b"2024-05-01 two\n" + b"z" * 200)
        await asyncio.sleep(0.1)
        with open(log, "ab") as f:
            f.write(b"\n  at end\n2024-05-01 three\n")
        await settle(lambda: len(sink.records) == 3)
        await src.stop()

    run(go())
    assert sink.records[0] == (b"2024-05-01 one\n" + b"  at frame\n" * 10)[:63] + b"\n"
    assert sink.records[1] == (b"2024-05-01 two\n" + b"z" * 200)[:63] + b"\n"  # a line longer than a record
    assert sink.records[2] == b"2024-05-01 three\n"  # the tails of the cut records are not records


def test_a_line_longer_than_max_record_bytes_is_cut_and_ends_with_the_terminator(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"short\n" + b"y" * 100 + b"\nafter\n")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink, max_record_bytes=32, truncated_record_terminator="|\n")
        await src.start()
        await settle(lambda: len(sink.records) == 3)
        await src.stop()

    run(go())
    assert sink.records == [b"short\n", b"y" * 30 + b"|\n", b"after\n"]


def test_a_cut_line_still_being_written_is_skipped_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"z" * 40)
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink, max_record_bytes=16)
        await src.start()
        await settle(lambda: len(sink.records) == 1)
        with open(log, "ab") as f:
            f.write(b"zzzz\nnext\n")
        await settle(lambda: len(sink.records) == 2)
        await src.stop()

    run(go())
    assert sink.records == [b"z" * 15 + b"\n", b"next\n"]


def test_compressed_rotations_are_not_tailed(tmp_path: Path) -> None:
    (tmp_path / "access.log").write_bytes(b"live\n")
    (tmp_path / "access.log.2.gz").write_bytes(b"\x1f\x8b compressed\n")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(tmp_path / "access.log*")], sink)
        await src.start()
        await settle(lambda: len(sink.records) == 1)
        await asyncio.sleep(0.1)
        await src.stop()

    run(go())
    assert sink.records == [b"live\n"]


def test_header_lines_are_skipped_in_each_file(tmp_path: Path) -> None:
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_bytes(b"h1\nh2\n" + name.encode() + b"\n")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(tmp_path / "*.csv")], sink, skip_header_lines=2)
        await src.start()
        await settle(lambda: len(sink.records) == 2)
        await src.stop()

    run(go())
    assert sorted(sink.records) == [b"a.csv\n", b"b.csv\n"]


def test_end_of_file_applies_to_files_found_at_first_start_only(tmp_path: Path) -> None:
    old = tmp_path / "old.log"
    old.write_bytes(b"history\n")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(tmp_path / "*.log")], sink, initial_position="end_of_file")
        await src.start()
        await asyncio.sleep(0.1)
        (tmp_path / "new.log").write_bytes(b"fresh\n")
        with open(old, "ab") as f:
            f.write(b"appended\n")
        await settle(lambda: len(sink.records) == 2)
        await src.stop()
        # A restart with the spool's positions: end_of_file no longer applies.
        (tmp_path / "later.log").write_bytes(b"while down\n")
        src2 = source([str(tmp_path / "*.log")], sink, initial_position="end_of_file")
        await src2.start()
        await settle(lambda: len(sink.records) == 3)
        await asyncio.sleep(0.1)
        await src2.stop()

    run(go())
    assert sorted(sink.records) == [b"appended\n", b"fresh\n", b"while down\n"]


def test_a_full_spool_stops_reading(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"x\n" * 10)
    sink = MemorySink()
    sink.room = False

    async def go() -> None:
        src = source([str(log)], sink)
        await src.start()
        await asyncio.sleep(0.2)
        assert sink.records == []
        sink.room = True
        await settle(lambda: len(sink.records) == 10)
        await src.stop()

    run(go())


def test_a_reused_inode_with_other_content_is_a_new_file(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"new content\n")
    st = log.stat()
    key = f"file/{st.st_dev}:{st.st_ino}"
    # A position left by an earlier file with this inode: its fingerprint does not match.
    sink = MemorySink({key: {"path": str(log), "fp": "0" * 40, "fp_len": 12, "offset": 5}, "file/started": True})

    async def go() -> None:
        src = source([str(log)], sink)
        await src.start()
        await settle(lambda: len(sink.records) == 1)
        await src.stop()

    run(go())
    assert sink.records == [b"new content\n"]


def test_file_source_config_errors_name_the_line_and_field() -> None:
    text = """\
streams:
  - name: logs
    sources:
      - type: file
        paths: []
        multi_line_start_pattern: "(["
        max_record_bytes: 2000000
        bogus: 1
    destination: {type: local, path: out}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yaml", {})
    errors = "\n".join(info.value.errors)
    assert "f.yaml:5: streams[0].sources[0].paths: list should have at least 1 item" in errors
    assert "f.yaml:6: streams[0].sources[0].multi_line_start_pattern: is not a valid regular expression" in errors
    assert "f.yaml:7: streams[0].sources[0].max_record_bytes: input should be less than or equal to 1024000" in errors
    assert "f.yaml:8: streams[0].sources[0].bogus: unknown field" in errors


def test_an_idle_file_skipped_by_end_of_file_stays_skipped_after_a_restart(tmp_path: Path) -> None:
    (tmp_path / "old.log").write_bytes(b"history 1\nhistory 2\n")
    sink = MemorySink()

    async def go() -> None:
        src = source([str(tmp_path / "*.log")], sink, initial_position="end_of_file")
        await src.start()
        await settle(lambda: any(k.startswith("file/") and k != "file/started" for k in sink.positions))
        await src.stop()
        src2 = source([str(tmp_path / "*.log")], sink, initial_position="end_of_file")
        await src2.start()
        await asyncio.sleep(0.2)
        await src2.stop()

    run(go())
    assert sink.records == []


def test_a_truncation_during_back_pressure_is_seen_before_reading_resumes(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"".join(b"old %03d\n" % i for i in range(50)))
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink)
        await src.start()
        await settle(lambda: len(sink.records) == 50)
        sink.room = False  # the spool is full
        os.truncate(log, 0)
        await asyncio.sleep(0.1)
        with open(log, "ab") as f:  # the logger goes on, past the old position
            f.write(b"".join(b"new %03d\n" % i for i in range(150)))
        await asyncio.sleep(0.1)
        sink.room = True
        await settle(lambda: len(sink.records) == 200)
        await src.stop()

    run(go())
    assert sink.records[50:] == [b"new %03d\n" % i for i in range(150)]


def test_idle_files_give_their_descriptors_back_and_are_reopened_when_they_grow(tmp_path: Path) -> None:
    for n in range(50):
        (tmp_path / f"f{n:02d}.log").write_bytes(b"line %d\n" % n)
    sink = MemorySink()
    proc_fds = Path("/proc/self/fd")

    events: list[dict[str, Any]] = []

    async def go() -> None:
        src = source([str(tmp_path / "*.log")], sink)
        before = len(list(proc_fds.iterdir()))
        await src.start()
        await settle(lambda: len(sink.records) == 50)
        await asyncio.sleep(0.4)  # past close_inactive_ms: every descriptor is given back
        assert len(list(proc_fds.iterdir())) <= before + 2
        with open(tmp_path / "f07.log", "ab") as f:
            f.write(b"more\n")
        await settle(lambda: len(sink.records) == 51)
        with capture_logs() as captured:
            os.unlink(tmp_path / "f08.log")  # read to its end, closed, then gone: released, nothing lost
            await settle(lambda: not any(isinstance(v, dict) and v.get("path", "").endswith("f08.log")
                                        for v in sink.positions.values()))
        events.extend(captured)
        await src.stop()

    run(go())
    assert sink.records[-1] == b"more\n"
    # Old logs cleaned up after they were read are not a loss: no warning, not counted.
    assert [e["event"] for e in events if "f08" in str(e.get("path", ""))] == ["file_source_released"]
    assert lost_count(sink) == 0


# ---------------------------------------------------------------- rotated files found by identity
def lines(start: int, stop: int) -> bytes:
    return b"".join(b"line %03d\n" % i for i in range(start, stop))


def key_of(path: Path) -> str:
    st = path.stat()
    return f"file/{st.st_dev}:{st.st_ino}"


def descriptor_open(path: Path) -> bool:
    """Whether this process holds a descriptor on ``path`` (whatever name the file has now)."""
    target = os.path.realpath(path)
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            continue
    return False


def lost_count(sink: MemorySink) -> float:
    value = sink.metrics.registry.get_sample_value(
        "firehose_FileSourceErrors_total", {"DeliveryStreamName": "logs", "reason": "rotated_file_lost"})
    return value or 0.0


def test_a_file_renamed_while_the_source_was_down_is_read_from_its_checkpoint_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines(0, 10))
    key = key_of(log)
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink)
        await src.start()
        await settle(lambda: len(sink.records) == 10)
        await src.stop()  # down (a kill -9 leaves the same spool: positions are committed with records)
        with open(log, "ab") as f:
            f.write(lines(10, 20))  # written before the rotation, never read
            os.rename(log, tmp_path / "app.log.1")
            f.write(lines(20, 30))  # the logger's last lines, into the renamed file
        log.write_bytes(lines(30, 40))  # the new file at the live name
        with capture_logs() as events:
            src2 = source([str(log)], sink)
            await src2.start()
            await settle(lambda: len(sink.records) >= 40 and sink.positions.get(key, {}) is None)
            await src2.stop()
        found = [e for e in events if e["event"] == "file_source_rotated_file_found"]
        assert [(e["path"], e["found_as"], e["bytes_unread"]) for e in found] == [
            (str(log), str(tmp_path / "app.log.1"), 180)]

    run(go())
    assert sorted(sink.records) == [b"line %03d\n" % i for i in range(40)]  # each once, none missing
    assert lost_count(sink) == 0


def test_a_file_renamed_while_its_descriptor_was_closed_is_read_to_its_end(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines(0, 10))
    key = key_of(log)
    sink = MemorySink()

    async def go() -> None:
        src = source([str(log)], sink)  # close_inactive_ms=100
        await src.start()
        await settle(lambda: len(sink.records) == 10)
        await settle(lambda: not descriptor_open(log))  # idle at its end: the descriptor is given back
        with open(log, "ab") as f:
            f.write(lines(10, 20))
            os.rename(log, tmp_path / "app.log.1")
            f.write(lines(20, 30))
        log.write_bytes(lines(30, 40))
        await settle(lambda: len(sink.records) >= 40 and sink.positions.get(key, {}) is None)
        await src.stop()

    run(go())
    assert sorted(sink.records) == [b"line %03d\n" % i for i in range(40)]
    assert lost_count(sink) == 0


def test_a_tracked_file_deleted_while_the_source_was_down_is_released_and_reported_lost(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines(0, 10))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "x.log").write_bytes(lines(0, 1))
    key, foreign = key_of(log), key_of(elsewhere / "x.log")
    sink = MemorySink({
        key: {"path": str(log), "fp": "0" * 40, "fp_len": 1024, "offset": 50},
        # A position of a file another source follows (a path this source does not match): not its to search.
        foreign: {"path": str(elsewhere / "x.log"), "fp": "1" * 40, "fp_len": 9, "offset": 9},
        "file/started": True})
    log.unlink()

    async def go() -> None:
        with capture_logs() as events:
            src = source([str(log)], sink)
            await src.start()
            await settle(lambda: sink.positions[key] is None)
            await src.stop()
        lost = [e for e in events if e["event"] == "file_source_rotated_file_lost"]
        assert [(e["log_level"], e["path"], e["reason"], e["bytes_unread"]) for e in lost] == [
            ("warning", str(log), "not_found", None)]

    run(go())
    assert lost_count(sink) == 1
    assert sink.positions[foreign]["offset"] == 9
    assert sink.records == []


def test_a_tracked_inode_now_holding_other_content_is_reported_lost_and_not_read(tmp_path: Path) -> None:
    (tmp_path / "app.log").write_bytes(b"")
    other = tmp_path / "app.log.1"  # the inode the spool knew, now another file's (deleted, then reused)
    other.write_bytes(b"someone else's content\n")
    key = key_of(other)
    sink = MemorySink({key: {"path": str(tmp_path / "app.log"), "fp": "0" * 40, "fp_len": 1024, "offset": 5},
                       "file/started": True})

    async def go() -> None:
        with capture_logs() as events:
            src = source([str(tmp_path / "app.log")], sink)
            await src.start()
            await settle(lambda: sink.positions[key] is None)
            await src.stop()
        lost = [e for e in events if e["event"] == "file_source_rotated_file_lost"]
        assert [(e["path"], e["reason"]) for e in lost] == [(str(tmp_path / "app.log"), "other_content")]

    run(go())
    assert sink.records == []
    assert lost_count(sink) == 1


def ident(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def test_the_identity_search_finds_a_renamed_file_by_device_and_inode(tmp_path: Path) -> None:
    for n in range(5):
        (tmp_path / f"other{n}.log").write_bytes(b"x\n")
    log = tmp_path / "app.log"
    log.write_bytes(b"x\n")
    wanted = ident(log)
    os.rename(log, tmp_path / "app.log.1")
    os.symlink(tmp_path / "app.log.1", tmp_path / "link")  # a name for it, but not the file itself
    search = IdentitySearch(budget=100)
    search.want(str(tmp_path), wanted)
    step = search.step()
    assert step.found == [(wanted, str(tmp_path / "app.log.1"))] and step.gone == []
    assert wanted not in search and len(search) == 0  # found: no longer looked for


def test_the_identity_search_examines_at_most_its_budget_per_step_and_gives_up_after_a_whole_pass(
    tmp_path: Path,
) -> None:
    for n in range(35):
        (tmp_path / f"f{n:02d}.log").write_bytes(b"x\n")
    gone = tmp_path / "app.log"
    gone.write_bytes(b"x\n")
    wanted = ident(gone)
    gone.unlink()
    search = IdentitySearch(budget=10)
    search.want(str(tmp_path), wanted)
    steps: list[SearchStep] = []
    while not steps or not steps[-1].gone:
        steps.append(search.step())
        assert len(steps) < 10
    assert [s.examined for s in steps] == [10, 10, 10, 5]  # 35 entries, 10 a step
    assert all(not s.gone for s in steps[:-1])  # not given up before the whole directory was seen
    assert steps[-1].gone == [(wanted, "not_found")] and len(search) == 0


def test_a_file_looked_for_in_the_middle_of_a_pass_gets_a_whole_pass_of_its_own(tmp_path: Path) -> None:
    for n in range(20):
        (tmp_path / f"f{n:02d}.log").write_bytes(b"x\n")
    first, second = (0, 10**12), (0, 10**12 + 1)  # identities no file has
    search = IdentitySearch(budget=5)
    search.want(str(tmp_path), first)
    assert search.step().examined == 5
    search.want(str(tmp_path), second)  # 5 entries of this pass already went by
    gone: list[tuple[tuple[int, int], str]] = []
    examined_when_second_gone = 5
    while len(gone) < 2:
        step = search.step()
        examined_when_second_gone += step.examined
        gone += step.gone
    assert gone == [(first, "not_found"), (second, "not_found")]
    assert examined_when_second_gone >= 40  # the rest of the first pass, then all of a second one


def test_the_identity_search_reports_files_of_a_removed_directory_as_gone(tmp_path: Path) -> None:
    search = IdentitySearch(budget=10)
    search.want(str(tmp_path / "rotated-away"), (1, 2))
    assert search.step().gone == [((1, 2), "directory_gone")]
    assert len(search) == 0


def test_positions_are_searched_only_under_names_the_source_matches() -> None:
    assert matched_by("/var/log/app.log", ["/var/log/app.log"])
    assert matched_by("/var/log/app/a.log", ["/var/log/*/*.log"])
    assert not matched_by("/var/log/app.log.1", ["/var/log/app.log"])
    assert not matched_by("/var/log/app/deep/a.log", ["/var/log/*/*.log"])  # a wildcard stays in one directory
    assert not matched_by("/var/log/.hidden.log", ["/var/log/*.log"])  # as glob: no leading dot for a wildcard
    assert matched_by("/var/log/.hidden.log", ["/var/log/.*.log"])


def splitter(limit: int = 16, start: bytes | None = None) -> tuple[RecordSplitter, list[int]]:
    cuts: list[int] = []
    pattern = re.compile(start, re.MULTILINE) if start is not None else None
    return RecordSplitter(limit, b"|\n", pattern, lambda: cuts.append(1)), cuts


def test_a_split_covers_complete_lines_only_and_a_cut_line_is_skipped_across_reads() -> None:
    split, cuts = splitter()
    f = FollowedFile(1, 2, "a.log", "", 0, 0, header_left=1)
    assert split.split(f, b"header\none\ntwo", eof=False) == ([b"one\n"], 11)  # "two" waits for its newline
    assert f.header_left == 0
    assert split.split(f, b"two\n", eof=False, final=True) == ([b"two\n"], 4)
    assert split.split(f, b"x" * 20, eof=False) == ([b"x" * 14 + b"|\n"], 20)  # longer than a record: cut now
    assert f.skip_line and cuts == [1]
    assert split.split(f, b"xxx", eof=False) == ([], 3)  # still inside the cut line
    assert split.split(f, b"x\nnext\n", eof=False) == ([b"next\n"], 7)
    assert not f.skip_line
    assert split.split(f, b"tail", eof=False, final=True) == ([b"tail"], 4)  # a finished file's last line


def test_a_multi_line_record_ends_at_the_next_start_line_or_once_the_file_is_quiet() -> None:
    split, cuts = splitter(limit=32, start=rb"\d")
    f = FollowedFile(1, 2, "a.log", "", 0, 0)
    assert split.split(f, b"1 a\n b\n2 c\n", eof=False) == ([b"1 a\n b\n"], 7)  # "2 c" may go on
    assert split.split(f, b"2 c\n", eof=True) == ([b"2 c\n"], 4)
    long = b"3 " + b"y" * 40 + b"\n"
    assert split.split(f, long + b" more\n4 d\n", eof=False) == ([long[:30] + b"|\n"], len(long + b" more\n"))
    assert cuts == [1] and not f.skip_record  # the cut record's tail was skipped up to the next start
    assert split.split(f, b"5 " + b"z" * 40 + b"\n", eof=False) == ([b"5 " + b"z" * 28 + b"|\n"], 43)
    assert f.skip_record  # no start line yet: the rest of the record is skipped in the next read
    assert split.split(f, b" rest\n6 e\n", eof=True) == ([b"6 e\n"], 10)
    assert cuts == [1, 1]


def test_a_followed_file_takes_up_the_position_it_wrote() -> None:
    f = FollowedFile(1, 2, "a.log", "ab12", 1024, 300, skip_line=True, header_left=2)
    saved = f.position()
    assert saved == {"path": "a.log", "fp": "ab12", "fp_len": 1024, "offset": 300, "skip_line": True, "header_left": 2}
    again = FollowedFile(1, 2, "a.log", "", 0, 0)
    again.restore(saved)
    assert (again.key, again.position()) == ("file/1:2", saved)
