"""The CLI as operators meet it when something is wrong: every problem one line on stderr (never
a traceback), `validate` catching what would stop `run`, plugins run or refused, `--version`,
`--help`, and logs that are JSON for machines and console lines on a terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from support import PLUGIN_SOURCE, Daemon, daemon_config, free_port, local_objects, stream_config, wait_for


def firehose(*args: str, cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "firehose", *args], cwd=cwd, input=stdin, capture_output=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


def write_config(tmp: Path, streams: list[dict[str, Any]], **extra: Any) -> Path:
    path = tmp / "firehose.yaml"
    path.write_text(yaml.safe_dump(daemon_config(tmp, streams, **extra), sort_keys=False))
    return path


def lambda_stream(name: str, function: str) -> dict[str, Any]:
    return stream_config(name, {"type": "local", "path": "out"}, processing=[{"type": "lambda", "function": function}])


def function_line(path: Path, stream: int) -> int:
    """The 1-based line of streams[stream]'s first ``function:`` key."""
    lines = [i + 1 for i, text in enumerate(path.read_text().splitlines()) if text.strip().startswith("function:")]
    return lines[stream]


def test_validate_reports_a_handler_that_run_could_not_import(tmp_path: Path) -> None:
    (tmp_path / "noisy.py").write_text("import sys\nprint('printed at import')\nprint('to stderr', file=sys.stderr)\n"
                                       "def handler(event, context):\n    return event\n")
    cfg = write_config(tmp_path, [lambda_stream("a", "noisy:handler"), lambda_stream("b", "missing_mod:handler")])
    res = firehose("validate", str(cfg), cwd=tmp_path)
    assert res.returncode == 2, res
    assert res.stderr.splitlines() == [
        f"{cfg}:{function_line(cfg, 1)}: streams[1].processing[0].function: handler 'missing_mod:handler' does not "
        "load: ModuleNotFoundError: No module named 'missing_mod'"
    ]
    assert res.stdout == ""  # what the handler module printed stays in the checking process
    good = write_config(tmp_path, [lambda_stream("a", "noisy:handler")])
    res = firehose("validate", str(good), cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{good}: OK (1 stream)\n", "")


def test_run_and_transform_refuse_a_handler_that_does_not_import_in_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [lambda_stream("a", "handlers.identity:handler"),
                                  lambda_stream("b", "handlers.broken_import:handler")])
    expected = [
        f"{cfg}:{function_line(cfg, 1)}: streams[1].processing[0].function: handler 'handlers.broken_import:handler' "
        "does not load: ModuleNotFoundError: No module named 'firehose_no_such_dependency'"
    ]
    res = firehose("run", "--config", str(cfg), cwd=tmp_path)
    assert (res.returncode, res.stderr.splitlines()) == (2, expected), res
    assert not (tmp_path / "data").exists()  # nothing started
    res = firehose("transform", "--config", str(cfg), "--stream", "b", cwd=tmp_path, stdin=b"x\n")
    assert (res.returncode, res.stderr.splitlines(), res.stdout) == (2, expected, ""), res


def test_a_port_in_use_is_one_line_and_the_started_streams_stop(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, [stream_config("a", {"type": "local", "path": "out"})],
                           api={"listen": f"127.0.0.1:{port}"})
        res = firehose("run", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"firehose: cannot start: api.listen 127.0.0.1:{port}: Address already in use"]
    events = [orjson.loads(line)["event"] for line in res.stdout.splitlines()]
    assert "daemon_stopped" in events  # the stream that had started was stopped, not abandoned


def test_a_spool_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [stream_config("a", {"type": "local", "path": "out"}),
                                  stream_config("b", {"type": "local", "path": "out"})])
    blocked = tmp_path / "data" / "spool" / "b"  # a file where the stream's spool directory goes
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a directory\n")
    res = firehose("run", "--config", str(cfg), cwd=tmp_path)
    assert (res.returncode, res.stderr) == (1, f"firehose: cannot start: {blocked}: File exists\n")
    events = [orjson.loads(line)["event"] for line in res.stdout.splitlines()]
    assert events[-1] == "daemon_stopped"  # stream a had started: it was stopped in order


def test_a_config_error_in_run_lists_every_problem_without_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("streams:\n  - name: a\n    buffering: {size_mib: lots}\n"
                   "    destination: {type: local, path: out, compression: lz4}\n")
    res = firehose("run", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"{cfg}:3: streams[0].buffering.size_mib: input should be a valid integer, got 'lots'",
        f"{cfg}:4: streams[0].destination.compression: unknown compression 'lz4'; known: none, gzip, zip, snappy, "
        "hadoop_snappy",
    ]


def test_an_invalid_log_level_and_bad_arguments_are_one_line(tmp_path: Path) -> None:
    res = firehose("run", cwd=tmp_path, env={"FIREHOSE_LOG_LEVEL": "loud"})
    assert (res.returncode, res.stderr) == (
        2, "firehose: FIREHOSE_LOG_LEVEL: must be one of debug, info, warning, error, got 'loud'\n")
    assert not (tmp_path / "var").exists()
    res = firehose("transform", "--config", "x.yaml", cwd=tmp_path)
    assert (res.returncode, res.stderr) == (
        2, "firehose transform: error: the following arguments are required: --stream "
           "(see firehose transform --help)\n")
    res = firehose("validate", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert (res.returncode, res.stderr) == (
        2, f"{tmp_path / 'nope.yaml'}: cannot read config: No such file or directory\n")


def test_version_and_help_say_what_each_command_reads_and_prints(tmp_path: Path) -> None:
    from importlib.metadata import version

    res = firehose("--version", cwd=tmp_path)
    assert (res.returncode, res.stdout) == (0, f"firehose {version('firehose')}\n")
    for command, reads in [("run", "Reads the config file"), ("validate", "imported"),
                           ("transform", "records read from stdin"), ("import-agent-config", "agent.json")]:
        res = firehose(command, "--help", cwd=tmp_path)
        assert res.returncode == 0
        assert reads in res.stdout and "Prints" in res.stdout, (command, res.stdout)


# --------------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------------

def _plugin_wheel(tmp_path: Path) -> Path:
    """A tiny plugin distribution as a wheel, the way a user's plugin package is shipped."""
    import zipfile

    wheel = tmp_path / "fh_e2e_plugin-1.0-py3-none-any.whl"
    info = "fh_e2e_plugin-1.0.dist-info"
    files = {
        "fh_e2e_plugin.py": PLUGIN_SOURCE,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: fh-e2e-plugin\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[firehose.destinations]\ncopy = fh_e2e_plugin:CopyDestinationConfig\n\n"
                                    "[firehose.sources]\ntail = fh_e2e_plugin:TailSourceConfig\n\n"
                                    "[firehose.processors]\nupper = fh_e2e_plugin:UpperConfig\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def test_destination_source_and_processor_plugins_run_end_to_end(tmp_path: Path) -> None:
    """A plugin package installed by pip (into a directory on PYTHONPATH, so the test venv stays
    as it is) with entry points in firehose.destinations, firehose.sources and
    firehose.processors: all three run in the daemon."""
    plugins = tmp_path / "plugins"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--target", str(plugins), str(_plugin_wheel(tmp_path))], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    log = tmp_path / "app.log"
    log.write_text("first\nsecond\n")
    stream = stream_config("p", {"type": "copy", "path": str(tmp_path / "out")},
                           sources=[{"type": "tail", "paths": [str(log)], "initial_position": "start_of_file"}],
                           processing=[{"type": "upper"}])
    env = {"PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream]), env=env).start()
    try:
        d.firehose().put_record(DeliveryStreamName="p", Record={"Data": b"third\n"})
        got = lambda: sorted(b"".join(local_objects(tmp_path / "out").values()).splitlines())  # noqa: E731
        wait_for(lambda: got() == [b"FIRST", b"SECOND", b"THIRD"], 30,
                 "the plugin source's records, through the plugin processor, in the plugin destination")
        described = d.firehose().describe_delivery_stream(DeliveryStreamName="p")["DeliveryStreamDescription"]
        extended = described["Destinations"][0]["ExtendedS3DestinationDescription"]
        assert extended["ProcessingConfiguration"] == {"Enabled": True,
                                                       "Processors": [{"Type": "Upper", "Parameters": []}]}
    finally:
        assert d.stop() == 0


# --------------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------------


def run_until_started(tmp_path: Path, cfg: Path, *args: str, env: dict[str, str] | None = None,
                      terminal: bool = True) -> str:
    """`firehose run` with stdout on a terminal (or a pipe), until daemon_started; what it wrote there."""
    if terminal:
        master, slave = pty.openpty()
    else:
        master, slave = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "firehose", "run", "--config", str(cfg), *args], cwd=tmp_path,
                            stdout=slave, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b"daemon_started" not in out:
            assert time.monotonic() < deadline, out
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:  # the terminal closed: the daemon exited
                    break
            assert proc.poll() is None, (out, proc.stderr.read() if proc.stderr else b"")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        os.close(master)
    return out.decode(errors="replace")


def test_logs_are_console_lines_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [stream_config("a", {"type": "local", "path": "out"})])
    def started_line(*args: str, **kw: Any) -> str:
        out = run_until_started(tmp_path, cfg, *args, **kw)
        (line,) = [line for line in out.splitlines() if "daemon_started" in line]
        return line

    plain = started_line(env={"NO_COLOR": "1"})
    assert not plain.lstrip().startswith("{") and "[info" in plain and "\x1b[" not in plain
    assert "\x1b[" in started_line(env={"NO_COLOR": ""})  # colours unless NO_COLOR
    assert orjson.loads(started_line("--log-format", "json"))["event"] == "daemon_started"
    # A pipe gets JSON; --log-format console forces the console renderer there (never coloured).
    assert orjson.loads(started_line(terminal=False))["event"] == "daemon_started"
    console = started_line("--log-format", "console", terminal=False, env={"NO_COLOR": ""})
    assert "[info" in console and "\x1b[" not in console


def test_library_log_records_are_one_json_line_with_their_traceback_inside(tmp_path: Path) -> None:
    """opensearch-py logs a failed request as a WARNING with the exception attached: it must be
    one JSON object, not a message followed by loose traceback lines."""
    closed = free_port()
    dest = {"type": "opensearch", "endpoint": f"http://127.0.0.1:{closed}", "index": "x",
            "request_timeout_secs": 2}
    stream = stream_config("os", dest, buffering={"size_mib": 1, "interval_secs": 0},
                           backup={"path": str(tmp_path / "backup")})
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream])).start()
    try:
        d.firehose().put_record(DeliveryStreamName="os", Record={"Data": b'{"a": 1}'})
        wait_for(lambda: any(e.get("logger", "").startswith("opensearch") for e in d.events()), 30,
                 "opensearch-py's failed-request warning")
    finally:
        d.stop()
    lines = [line for line in d.logs().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]
    warning = next(e for e in d.events() if e.get("logger", "").startswith("opensearch"))
    assert warning["level"] == "warning" and "Traceback" in warning.get("exception", "")


def test_stdlib_logging_goes_through_the_same_renderer(tmp_path: Path) -> None:
    code = (
        "import logging, warnings\n"
        "from firehose import logging as fl\n"
        "fl.configure('info', 'json')\n"
        "logging.getLogger('botocore.credentials').info('noise below warning')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
        "    logging.getLogger('aiohttp.server').exception('Error handling request')\n"
        "warnings.warn('a library warning')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    docs = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert [(d["logger"], d["level"]) for d in docs] == [("aiohttp.server", "error"), ("py.warnings", "warning")]
    assert docs[0]["event"] == "Error handling request" and "ZeroDivisionError" in docs[0]["exception"]


@pytest.mark.parametrize("value", ["debug", "WARNING"])
def test_log_level_is_honoured(tmp_path: Path, value: str) -> None:
    d = Daemon(tmp_path, daemon_config(tmp_path, [stream_config("a", {"type": "local", "path": "out"})]),
               env={"FIREHOSE_LOG_LEVEL": value}).start()
    assert d.stop() == 0
    events = [e["event"] for e in d.events()]
    assert ("daemon_started" in events) == (value == "debug")
