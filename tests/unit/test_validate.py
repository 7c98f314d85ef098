"""``firehose validate``'s checks beyond the file: local Lambda handlers imported in a child
process (as the transformation workers import them), format schemas compiled, every problem
reported in one pass."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from firehose.config import ConfigError, load_config
from firehose.config_checks import check_handlers, check_schemas, validate_file


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def lambda_stream(name: str, function: str, extra: str = "") -> str:
    return (
        f"  - name: {name}\n"
        f"    processing:\n"
        f"      - type: lambda\n"
        f"        function: {function}\n"
        f"{extra}"
        f"    destination: {{type: local, path: out}}\n"
    )


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Handlers live in the working directory, where `firehose run` finds them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_handlers_that_do_not_load_are_reported_at_their_function_key(workdir: Path) -> None:
    write(workdir / "hmod.py", "NOT_CALLABLE = 3\n\ndef handler(event, context):\n    return event\n")
    cfg = write(workdir / "f.yaml", "streams:\n"
                + lambda_stream("a", "no_such_module:handler")
                + lambda_stream("b", "hmod:missing")
                + lambda_stream("c", "hmod:NOT_CALLABLE")
                + lambda_stream("d", "hmod:handler"))
    _, problems = validate_file(str(cfg))
    assert problems == [
        f"{cfg}:5: streams[0].processing[0].function: handler 'no_such_module:handler' does not load: "
        "ModuleNotFoundError: No module named 'no_such_module'",
        f"{cfg}:10: streams[1].processing[0].function: handler 'hmod:missing' does not load: "
        "AttributeError: module 'hmod' has no attribute 'missing'",
        f"{cfg}:15: streams[2].processing[0].function: handler 'hmod:NOT_CALLABLE' does not load: "
        "TypeError: hmod:NOT_CALLABLE is a int, not a callable",
    ]


def test_lambdas_module_dot_function_form_is_accepted_and_checked(workdir: Path) -> None:
    write(workdir / "lambda_function.py", "def lambda_handler(event, context):\n    return event\n")
    good = write(workdir / "good.yaml", "streams:\n" + lambda_stream("a", "lambda_function.lambda_handler"))
    assert validate_file(str(good))[1] == []
    bad = write(workdir / "bad.yaml", "streams:\n" + lambda_stream("a", "lambda_function.handler"))
    assert validate_file(str(bad))[1] == [
        f"{bad}:5: streams[0].processing[0].function: handler 'lambda_function.handler' does not load: "
        "AttributeError: module 'lambda_function' has no attribute 'handler'"
    ]
    malformed = write(workdir / "m.yaml", "streams:\n" + lambda_stream("a", "'not a reference'"))
    assert validate_file(str(malformed))[1] == [
        f"{malformed}:5: streams[0].processing[0].function: must be 'module:callable' (or Lambda's "
        "'module.callable'), got 'not a reference'"
    ]


def test_all_handlers_of_a_file_are_imported_in_one_child_process(workdir: Path) -> None:
    pids = workdir / "pids"
    for name in ("h1", "h2", "h3"):
        write(workdir / f"{name}.py", "import os\n"
              f"with open({str(pids)!r}, 'a') as f:\n    f.write(f'{{os.getpid()}}\\n')\n"
              "def handler(event, context):\n    return event\n")
    cfg = write(workdir / "f.yaml", "streams:\n" + "".join(lambda_stream(f"s{i}", f"h{i}:handler") for i in (1, 2, 3)))
    assert validate_file(str(cfg))[1] == []
    seen = pids.read_text().split()
    assert len(seen) == 3 and len(set(seen)) == 1 and int(seen[0]) != os.getpid()


def test_a_hanging_import_is_killed_at_the_timeout_and_the_next_handlers_are_still_checked(workdir: Path) -> None:
    write(workdir / "hangs.py", "import time\ntime.sleep(600)\n")
    write(workdir / "after.py", "X = 1\n")
    cfg = write(workdir / "f.yaml", "streams:\n" + lambda_stream("a", "hangs:handler") + lambda_stream("b", "after:handler"))
    started = time.monotonic()
    _, problems = validate_file(str(cfg), handler_timeout_secs=1.0)
    assert time.monotonic() - started < 30
    assert problems == [
        f"{cfg}:5: streams[0].processing[0].function: handler 'hangs:handler' did not finish importing "
        "within 1 s (the import was killed)",
        f"{cfg}:10: streams[1].processing[0].function: handler 'after:handler' does not load: "
        "AttributeError: module 'after' has no attribute 'handler'",
    ]


def test_imports_that_exit_crash_or_raise_are_reported_and_do_not_stop_the_check(workdir: Path) -> None:
    write(workdir / "exits.py", "import sys\nsys.exit(3)\n")
    write(workdir / "hard_exit.py", "import os\nos._exit(7)\n")
    write(workdir / "segfaults.py", "import ctypes\nctypes.string_at(0)\n")
    write(workdir / "syntax.py", "def handler(:\n")
    write(workdir / "fine.py", "print('hello from an import')\ndef handler(event, context):\n    return event\n")
    cfg = write(workdir / "f.yaml", "streams:\n"
                + lambda_stream("a", "exits:handler") + lambda_stream("b", "hard_exit:handler")
                + lambda_stream("c", "segfaults:handler") + lambda_stream("d", "syntax:handler")
                + lambda_stream("e", "fine:handler"))
    _, problems = validate_file(str(cfg))
    assert problems == [
        f"{cfg}:5: streams[0].processing[0].function: handler 'exits:handler' does not load: SystemExit: 3",
        f"{cfg}:10: streams[1].processing[0].function: importing handler 'hard_exit:handler' ended the "
        "process (exit status 7)",
        f"{cfg}:15: streams[2].processing[0].function: importing handler 'segfaults:handler' ended the "
        "process (killed by SIGSEGV)",
        f"{cfg}:20: streams[3].processing[0].function: handler 'syntax:handler' does not load: "
        "SyntaxError: invalid syntax (syntax.py, line 1)",
    ]


def test_handlers_are_imported_from_the_working_directory_as_run_does_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confdir = tmp_path / "conf"
    write(confdir / "beside.py", "def handler(event, context):\n    return event\n")
    cfg = write(confdir / "f.yaml", "streams:\n" + lambda_stream("a", "beside:handler"))
    monkeypatch.chdir(confdir)
    assert validate_file("f.yaml")[1] == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (problem,) = validate_file(str(cfg))[1]
    assert problem.startswith(f"{cfg}:5: streams[0].processing[0].function: handler 'beside:handler' does "
                              "not load: ModuleNotFoundError: No module named 'beside'")
    assert f"is in the config file's directory {confdir}" in problem
    assert f"the working directory {elsewhere}" in problem and "PYTHONPATH" in problem


def test_remote_functions_are_not_invoked(workdir: Path) -> None:
    cfg = write(workdir / "f.yaml", "streams:\n  - name: a\n    processing:\n"
                "      - {type: lambda, arn: 'arn:aws:lambda:us-east-1:123456789012:function:f', "
                "endpoint_url: 'http://127.0.0.1:9'}\n    destination: {type: local, path: out}\n")
    config, problems = validate_file(str(cfg))
    assert problems == [] and config is not None


def test_errors_in_one_stream_do_not_hide_its_handler_or_other_streams(workdir: Path) -> None:
    cfg = write(workdir / "f.yaml", "streams:\n"
                "  - name: a\n"
                "    buffering: {size_mib: five}\n"
                "    processing:\n"
                "      - {type: lambda, function: 'gone:handler'}\n"
                "      - {type: decompression, compression_format: lz}\n"
                "    destination: {type: local, path: out, compression: lz4}\n"
                + lambda_stream("b", "also_gone:handler"))
    with pytest.raises(ConfigError):
        load_config(str(cfg))
    _, problems = validate_file(str(cfg))
    assert problems == [
        f"{cfg}:3: streams[0].buffering.size_mib: input should be a valid integer, got 'five'",
        f"{cfg}:7: streams[0].destination.compression: unknown compression 'lz4'; known: none, gzip, zip, "
        "snappy, hadoop_snappy",
        f"{cfg}:6: streams[0].processing[1].compression_format: input should be 'gzip' or 'GZIP', got 'lz'",
        f"{cfg}:5: streams[0].processing[0].function: handler 'gone:handler' does not load: "
        "ModuleNotFoundError: No module named 'gone'",
        f"{cfg}:11: streams[1].processing[0].function: handler 'also_gone:handler' does not load: "
        "ModuleNotFoundError: No module named 'also_gone'",
    ]


PARQUET = ("  - name: {name}\n    format:\n      type: {kind}\n      schema:\n{schema}"
           "    destination: {{type: local, path: out, compression: none}}\n")


def test_inline_and_file_schemas_are_compiled_and_glue_is_not_fetched(workdir: Path) -> None:
    write(workdir / "bad.avsc", '{"type": "record", "name": "r", "fields": [{"name": "a", "type": "nope"}]}')
    write(workdir / "good.avsc", '{"type": "record", "name": "r", "fields": [{"name": "a", "type": "long"}]}')
    cfg = write(workdir / "f.yaml", "streams:\n"
                + PARQUET.format(name="inline", kind="avro", schema="        columns: [{name: a-b, type: int}]\n")
                + PARQUET.format(name="missing", kind="parquet", schema="        avro_schema: nowhere.avsc\n")
                + PARQUET.format(name="bad", kind="parquet", schema="        avro_schema: bad.avsc\n")
                + PARQUET.format(name="good", kind="orc", schema="        avro_schema: good.avsc\n")
                + PARQUET.format(name="glue", kind="parquet",
                                 schema="        glue: {database: d, table: t, endpoint_url: 'http://127.0.0.1:9'}\n"))
    _, problems = validate_file(str(cfg))
    assert [p.split(": schema does not compile: ")[0] for p in problems] == [
        f"{cfg}:5: streams[0].format.schema",
        f"{cfg}:12: streams[1].format.schema.avro_schema",
        f"{cfg}:18: streams[2].format.schema.avro_schema",
    ]
    assert "'a-b' is not a valid Avro name" in problems[0]
    assert "nowhere.avsc" in problems[1] and "cannot read it" in problems[1]
    assert "nope" in problems[2]


def test_check_handlers_and_schemas_take_the_streams_of_a_copy(workdir: Path) -> None:
    """The daemon's reload checks only the streams it adds or changes: a copy of the config
    with those streams, whose problems still point at their lines in the file."""
    cfg_path = write(workdir / "f.yaml", "streams:\n" + lambda_stream("a", "gone_a:handler")
                     + lambda_stream("b", "gone_b:handler")
                     + PARQUET.format(name="c", kind="avro", schema="        columns: [{name: a-b, type: int}]\n"))
    cfg = load_config(str(cfg_path))
    only_b = cfg.model_copy(update={"streams": [cfg.streams[1]]})
    assert check_handlers(only_b) == [
        f"{cfg_path}:10: streams[1].processing[0].function: handler 'gone_b:handler' does not load: "
        "ModuleNotFoundError: No module named 'gone_b'"
    ]
    assert check_schemas(only_b) == []
    assert [p.split(":")[1] for p in check_schemas(cfg)] == ["15"]
