"""File source processing options: Kinesis Agent's dataProcessingOptions, byte for byte.

Expected outputs for the Kinesis Agent cases are the ones its own converter tests assert."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from firehose.clock import ManualClock
from firehose.sources.file_options import (
    FILE_OPTION_TYPES,
    ConversionError,
    FileOption,
    build_converter,
    from_agent_option,
)

ADAPTER: TypeAdapter[FileOption] = TypeAdapter(FileOption)


def conv(*options: dict[str, Any], clock: ManualClock | None = None) -> Any:
    return build_converter([ADAPTER.validate_python(o) for o in options], clock=clock)


# --- single_line ---------------------------------------------------------------------------------


def test_single_line_trims_and_joins_the_lines_of_a_record() -> None:
    c = conv({"type": "single_line"})
    assert c(b"  one line\t\n") == b"one line\n"
    assert c(b"no newline") == b"no newline\n"
    assert c(b"java stack\r\n\tat a.b(C.java:1)\r\n\tat d.e(F.java:2)\n") == b"java stackat a.b(C.java:1)at d.e(F.java:2)\n"
    # Empty lines at the end are dropped (String.split), inner ones kept (as empty strings).
    assert c(b"a\n\nb\n\n\n") == b"ab\n"
    assert c(b"\n") == b"\n"


def test_single_line_escape_new_line_writes_kinesis_agents_backslash_backslash_n() -> None:
    c = conv({"type": "single_line", "escape_new_line": True})
    record = (b'{\n   "a": {\n           "b": 1,\n           "c": null,\n           "d": true\n    },\n'
              b'   "e": "f",\n   "g": 2\n     }\n')
    assert c(record) == (b'{\\\\n"a": {\\\\n"b": 1,\\\\n"c": null,\\\\n"d": true\\\\n},\\\\n'
                         b'"e": "f",\\\\n"g": 2\\\\n}\n')


def test_single_line_no_trim_keeps_spaces_and_carriage_returns() -> None:
    c = conv({"type": "single_line", "no_trim": True})
    assert c(b"  a \r\n  b\n") == b"  a \r  b\n"
    c = conv({"type": "single_line", "no_trim": True, "escape_new_line": True})
    assert c(b" a\n b \n") == b" a\\\\n b \n"


def test_single_line_passes_bytes_that_are_not_utf8_through() -> None:
    assert conv({"type": "single_line"})(b" \xff\xfe\n\xc3(\n") == b"\xff\xfe\xc3(\n"


# --- csv_to_json ---------------------------------------------------------------------------------

FOUR = {"type": "csv_to_json", "field_names": ["column1", "column2", "column3", "column4"]}


def test_csv_to_json_kinesis_agent_cases() -> None:
    c = conv(FOUR)
    assert c(b"value1, value2,valu\ne3,    value4\n") == (
        b'{"column1":"value1","column2":" value2","column3":"valu\\ne3","column4":"    value4"}\n')
    # Missing columns are null; extra columns are dropped.
    assert c(b"value1, value2,value3\n") == (
        b'{"column1":"value1","column2":" value2","column3":"value3","column4":null}\n')
    assert c(b"value1,value2,value3,value4,value5\n") == (
        b'{"column1":"value1","column2":"value2","column3":"value3","column4":"value4"}\n')


def test_csv_to_json_empty_columns_at_the_end_are_null_inner_ones_empty() -> None:
    c = conv(FOUR)
    assert c(b"a,,\n") == b'{"column1":"a","column2":null,"column3":null,"column4":null}\n'
    assert c(b",,,\n") == b'{"column1":null,"column2":null,"column3":null,"column4":null}\n'
    assert c(b"a,,x,\n") == b'{"column1":"a","column2":"","column3":"x","column4":null}\n'
    # The kept columns are followed by a non-empty one beyond field_names: they stay "".
    two = conv({"type": "csv_to_json", "field_names": ["a", "b"]})
    assert two(b"x,,y\n") == b'{"a":"x","b":""}\n'
    assert two(b"x,,,\n") == b'{"a":"x","b":null}\n'
    assert two(b"\n") == b'{"a":"","b":null}\n'


def test_csv_to_json_tab_delimiter_and_no_quoting() -> None:
    tsv = conv({**FOUR, "delimiter": "\t"})
    assert tsv(b"value1\t value2\tvalue3\t    value4\n") == (
        b'{"column1":"value1","column2":" value2","column3":"value3","column4":"    value4"}\n')
    # Kinesis Agent splits with String.split: quotes are ordinary characters.
    c = conv({"type": "csv_to_json", "field_names": ["a", "b", "c"]})
    assert c(b'"x,y",z\n') == b'{"a":"\\"x","b":"y\\"","c":"z"}\n'
    assert c("é,ü\n".encode()) == '{"a":"é","b":"ü","c":null}\n'.encode()


def test_csv_to_json_rejects_invalid_utf8() -> None:
    with pytest.raises(ConversionError, match=r"csv_to_json: record is not valid UTF-8 \(byte 0xff at offset 2\)"):
        conv(FOUR)(b"a,\xff\n")


# --- log_to_json ---------------------------------------------------------------------------------

COMMON_OUT = (b'{"host":"123.45.67.89","ident":null,"authuser":null,"datetime":"27/Oct/2000:09:27:09 -0400",'
              b'"request":"GET /java/javaResources.html HTTP/1.0","response":"200","bytes":"10450"}\n')


def test_common_apache_log() -> None:
    c = conv({"type": "log_to_json", "log_format": "common_apache_log"})
    line = b'123.45.67.89 - - [27/Oct/2000:09:27:09 -0400] "GET /java/javaResources.html HTTP/1.0" 200 10450'
    assert c(line + b"\n") == COMMON_OUT
    assert c(line) == COMMON_OUT
    # Anything after the last field is allowed (a combined line read as common).
    assert c(line + b' "-" "Mozilla/4.6 [en] (X11; U; OpenBSD 2.8 i386; Nav)"\n') == COMMON_OUT
    assert c(b'64.242.88.10 frank bob [07/Mar/2004:16:10:02 -0800] "GET /mailman/listinfo/hsdivision HTTP/1.1" 200 -\n') == (
        b'{"host":"64.242.88.10","ident":"frank","authuser":"bob","datetime":"07/Mar/2004:16:10:02 -0800",'
        b'"request":"GET /mailman/listinfo/hsdivision HTTP/1.1","response":"200","bytes":null}\n')
    assert c(b'lj1036.inktomisearch.com - - [27/Oct/2000:09:27:09 -0400] "GET /java/javaResources.html HTTP/1.0" 200 10450') == (
        COMMON_OUT.replace(b"123.45.67.89", b"lj1036.inktomisearch.com"))


def test_combined_apache_log() -> None:
    c = conv({"type": "log_to_json", "log_format": "combined_apache_log"})
    line = (b'123.45.67.89 - - [27/Oct/2000:09:27:09 -0400] "GET /java/javaResources.html HTTP/1.0" 200 10450 '
            b'"-" "Mozilla/4.6 [en] (X11; U; OpenBSD 2.8 i386; Nav)" "ANY_RANDOM_DATA"\n')
    assert c(line) == (
        b'{"host":"123.45.67.89","ident":null,"authuser":null,"datetime":"27/Oct/2000:09:27:09 -0400",'
        b'"request":"GET /java/javaResources.html HTTP/1.0","response":"200","bytes":"10450","referer":null,'
        b'"agent":"Mozilla/4.6 [en] (X11; U; OpenBSD 2.8 i386; Nav)"}\n')


def test_apache_error_log() -> None:
    c = conv({"type": "log_to_json", "log_format": "apache_error_log"})
    msg = b"File does not exist: /usr/local/apache2/htdocs/favicon.ico"
    assert c(b"[Fri Sep 09 10:42:29.902022 2011] [core:error] [pid 35708:tid 4328636416] [client 72.15.99.187] " + msg + b"\n") == (
        b'{"timestamp":"Fri Sep 09 10:42:29.902022 2011","module":"core","severity":"error","processid":"35708",'
        b'"threadid":"4328636416","client":"72.15.99.187","message":"' + msg + b'"}\n')
    assert c(b"[Fri Sep 09 10:42:29 2011] [core:error] [pid 35708] [client 72.15.99.187] " + msg) == (
        b'{"timestamp":"Fri Sep 09 10:42:29 2011","module":"core","severity":"error","processid":"35708",'
        b'"threadid":null,"client":"72.15.99.187","message":"' + msg + b'"}\n')
    assert c(b"[Fri Sep 09 10:42:29.902022 2011] [error] [pid 35708:tid 4328636416] [client 72.15.99.187:12345] " + msg) == (
        b'{"timestamp":"Fri Sep 09 10:42:29.902022 2011","module":null,"severity":"error","processid":"35708",'
        b'"threadid":"4328636416","client":"72.15.99.187:12345","message":"' + msg + b'"}\n')


def test_syslog_rfc3164() -> None:
    c = conv({"type": "log_to_json", "log_format": "syslog"})
    assert c(b"Mar 12 12:00:08 server2 rcd[308]: Loaded 12 packages in 'ximian-red-carpet|351' (0.01878 seconds) \n") == (
        b'{"timestamp":"Mar 12 12:00:08","hostname":"server2","program":"rcd","processid":"308",'
        b'"message":"Loaded 12 packages in \'ximian-red-carpet|351\' (0.01878 seconds) "}\n')
    assert c(b"Mar 12 12:01:02 server4 snort: Ports to decode telnet on: 21 23 25 119\n") == (
        b'{"timestamp":"Mar 12 12:01:02","hostname":"server4","program":"snort","processid":null,'
        b'"message":"Ports to decode telnet on: 21 23 25 119"}\n')
    # A facility.priority tag is skipped; a "-" message stays "-" (no null rule in the syslog parser).
    assert c(b"Nov  3 07:15:01 <3.4> web-1 CRON[12345]: -\n") == (
        b'{"timestamp":"Nov  3 07:15:01","hostname":"web-1","program":"CRON","processid":"12345","message":"-"}\n')


def test_syslog_rfc3339() -> None:
    c = conv({"type": "log_to_json", "log_format": "rfc3339_syslog"})
    assert c(b"2026-11-29T12:00:01.123456+00:00 ip-10-0-0-1 sshd[812]: Accepted publickey for ec2-user\n") == (
        b'{"timestamp":"2026-11-29T12:00:01.123456+00:00","hostname":"ip-10-0-0-1","program":"sshd",'
        b'"processid":"812","message":"Accepted publickey for ec2-user"}\n')
    assert c(b"2026-11-29T12:00:01Z host systemd: Started Session 5.") == (
        b'{"timestamp":"2026-11-29T12:00:01Z","hostname":"host","program":"systemd","processid":null,'
        b'"message":"Started Session 5."}\n')


def test_log_to_json_renames_fields_and_takes_a_custom_pattern() -> None:
    names = [f"column{i}" for i in range(1, 8)]
    c = conv({"type": "log_to_json", "log_format": "common_apache_log", "field_names": names})
    assert c(b'123.45.67.89 - - [27/Oct/2000:09:27:09 -0400] "GET /java/javaResources.html HTTP/1.0" 200 10450') == (
        b'{"column1":"123.45.67.89","column2":null,"column3":null,"column4":"27/Oct/2000:09:27:09 -0400",'
        b'"column5":"GET /java/javaResources.html HTTP/1.0","column6":"200","column7":"10450"}\n')
    c = conv({"type": "log_to_json", "log_format": "common_apache_log",
              "match_pattern": r'^([\d.]+) (\S+) (\S+) \[([\w:/]+\s[+\-]\d{4})\] "(.+?)" (\d{3})',
              "field_names": names[:6]})
    assert c(b'123.45.67.89 - - [27/Oct/2000:09:27:09 -0400] "GET /java/javaResources.html HTTP/1.0" 200\n') == (
        b'{"column1":"123.45.67.89","column2":null,"column3":null,"column4":"27/Oct/2000:09:27:09 -0400",'
        b'"column5":"GET /java/javaResources.html HTTP/1.0","column6":"200"}\n')
    # With a syslog format, "-" stays a string even with a custom pattern.
    c = conv({"type": "log_to_json", "log_format": "syslog", "match_pattern": r"(\S+) (.*)", "field_names": ["k", "v"]})
    assert c(b"- x\n") == b'{"k":"-","v":"x"}\n'


def test_log_to_json_errors_name_the_format_not_the_payload() -> None:
    c = conv({"type": "log_to_json", "log_format": "common_apache_log"})
    with pytest.raises(ConversionError) as e:
        c(b'123.45.67.89 - - [27/Oct/2000:09:27:09 -0400] "GET /java/javaResources.html HTTP/1.0" 200\n')
    assert str(e.value) == "log_to_json: line does not match the common_apache_log format (89 characters)"
    c = conv({"type": "log_to_json", "log_format": "syslog", "match_pattern": r"(\d+)", "field_names": ["n"]})
    with pytest.raises(ConversionError, match=r"^log_to_json: line does not match match_pattern \(3 characters\)$"):
        c(b"abc\n")
    with pytest.raises(ConversionError, match=r"^log_to_json: record is not valid UTF-8 \(byte 0xc3 at offset 3\)$"):
        c(b"123\xc3\n")


# --- add_metadata --------------------------------------------------------------------------------


def test_add_metadata_with_a_fixed_clock() -> None:
    clock = ManualClock(now_ms=1_764_417_600_007)  # 2025-11-29T12:00:00.007Z
    c = conv({"type": "add_metadata", "timestamp": True, "metadata": {"key": "value", "foo": {"bar": "bas"}}},
             clock=clock)
    assert c(b"This is the data\n") == (
        b'{"ts":"2025-11-29T12:00:00.007Z","metadata":{"key":"value","foo":{"bar":"bas"}},"data":"This is the data"}\n')
    clock.advance(0.002)  # same second: the cached date part, new milliseconds
    assert c(b"x") == b'{"ts":"2025-11-29T12:00:00.009Z","metadata":{"key":"value","foo":{"bar":"bas"}},"data":"x"}\n'
    clock.advance(1.498)
    assert c("naïve \"quoted\"\t\r\n".encode()) == (
        '{"ts":"2025-11-29T12:00:01.507Z","metadata":{"key":"value","foo":{"bar":"bas"}},'
        '"data":"naïve \\"quoted\\"\\t\\r"}\n'.encode())


def test_add_metadata_without_timestamp_and_its_errors() -> None:
    c = conv({"type": "add_metadata"})
    assert c(b"x") == b'{"metadata":{},"data":"x"}\n'
    c = conv({"type": "add_metadata", "metadata": {"n": 1, "ok": True, "l": [None]}})
    assert c(b"line one\nline two\n") == b'{"metadata":{"n":1,"ok":true,"l":[null]},"data":"line one\\nline two"}\n'
    with pytest.raises(ConversionError, match=r"^add_metadata: record is not valid UTF-8 \(byte 0xff at offset 0\)$"):
        c(b"\xff\n")


# --- chains and config ---------------------------------------------------------------------------


def test_options_apply_in_order() -> None:
    clock = ManualClock(now_ms=0)
    c = conv({"type": "single_line"}, {"type": "add_metadata", "timestamp": True, "metadata": {"host": "web-1"}},
             clock=clock)
    assert c(b"ERROR boom\n  at x\n") == b'{"ts":"1970-01-01T00:00:00.000Z","metadata":{"host":"web-1"},"data":"ERROR boomat x"}\n'
    c = conv({"type": "single_line"}, {"type": "log_to_json", "log_format": "syslog"}, {"type": "add_metadata"})
    assert c(b"Mar  1 00:00:00 h p: m\n") == (
        b'{"metadata":{},"data":"{\\"timestamp\\":\\"Mar  1 00:00:00\\",\\"hostname\\":\\"h\\",\\"program\\":\\"p\\",'
        b'\\"processid\\":null,\\"message\\":\\"m\\"}"}\n')
    assert build_converter([])(b"as is\r\n") == b"as is\r\n"
    assert FILE_OPTION_TYPES == ("single_line", "csv_to_json", "log_to_json", "add_metadata")


@pytest.mark.parametrize(("option", "message"), [
    ({"type": "csv_to_json", "field_names": []}, "field_names\n  List should have at least 1 item"),
    ({"type": "csv_to_json", "field_names": ["a"], "delimiter": "::"}, "must be one character other than a newline, got '::'"),
    ({"type": "log_to_json", "log_format": "syslog", "match_pattern": "(a)"}, "field_names is required with match_pattern"),
    ({"type": "log_to_json", "log_format": "syslog", "match_pattern": "(a)(b)", "field_names": ["x"]},
     "match_pattern has 2 capturing groups but field_names has 1 names"),
    ({"type": "log_to_json", "log_format": "syslog", "match_pattern": "(a", "field_names": ["x"]},
     "match_pattern: not a valid regular expression: missing ), unterminated subpattern at position 0"),
    ({"type": "log_to_json", "log_format": "syslog", "field_names": ["x"]},
     "syslog has 5 fields (timestamp, hostname, program, processid, message), field_names has 1"),
    ({"type": "log_to_json", "log_format": "nginx"}, "log_format\n  Input should be 'common_apache_log'"),
    ({"type": "add_metadata", "metadata": {"t": object()}}, "must be JSON"),
    ({"type": "single_line", "trim": False}, "trim\n  Extra inputs are not permitted"),
    ({"type": "single_line", "no_trim": "yes"}, "no_trim\n  Input should be a valid boolean"),
    ({"type": "add_brackets"}, "does not match any of the expected tags"),
])
def test_invalid_options_are_rejected(option: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(option)
    assert message in str(e.value)


# --- Kinesis Agent's names -----------------------------------------------------------------------


@pytest.mark.parametrize(("agent", "ours"), [
    ({"optionName": "SINGLELINE"}, {"type": "single_line"}),
    ({"optionName": "SINGLELINE", "parseOptions": ["NO_TRIM", "ESCAPE_NEW_LINE"]},
     {"type": "single_line", "no_trim": True, "escape_new_line": True}),
    ({"optionName": "CSVTOJSON", "customFieldNames": ["a", "b"]}, {"type": "csv_to_json", "field_names": ["a", "b"]}),
    ({"optionName": "CSVTOJSON", "customFieldNames": ["a", "b"], "delimiter": "\\t"},
     {"type": "csv_to_json", "field_names": ["a", "b"], "delimiter": "\t"}),
    ({"optionName": "CSVTOJSON", "customFieldNames": ["a", "b"], "delimiter": "\\|"},
     {"type": "csv_to_json", "field_names": ["a", "b"], "delimiter": "|"}),
    ({"optionName": "CSVTOJSON", "customFieldNames": ["a", "b"], "delimiter": ";"},
     {"type": "csv_to_json", "field_names": ["a", "b"], "delimiter": ";"}),
    ({"optionName": "LOGTOJSON", "logFormat": "COMBINEDAPACHELOG"}, {"type": "log_to_json", "log_format": "combined_apache_log"}),
    ({"optionName": "LOGTOJSON", "logFormat": "RFC3339SYSLOG", "matchPattern": "(\\S+) (.*)", "customFieldNames": ["a", "b"]},
     {"type": "log_to_json", "log_format": "rfc3339_syslog", "match_pattern": "(\\S+) (.*)", "field_names": ["a", "b"]}),
    ({"optionName": "ADDMETADATA", "timestamp": "true", "metadata": {"k": "v"}},
     {"type": "add_metadata", "timestamp": True, "metadata": {"k": "v"}}),
    ({"optionName": "ADDMETADATA", "timestamp": "false"}, {"type": "add_metadata"}),
])
def test_from_agent_option(agent: dict[str, Any], ours: dict[str, Any]) -> None:
    assert from_agent_option(agent) == (ours, [])
    ADAPTER.validate_python(ours)


def test_from_agent_option_notes_and_refusals() -> None:
    assert from_agent_option({"optionName": "LOGTOJSON", "logFormat": "SYSLOG", "jsonFormat": "PRETTYPRINT"}) == (
        {"type": "log_to_json", "log_format": "syslog"},
        ["LOGTOJSON: jsonFormat PRETTYPRINT is not supported; records are compact JSON, one a line"])
    assert from_agent_option({"optionName": "SINGLELINE", "parseOptions": ["SQUASH"], "extra": 1}) == (
        {"type": "single_line"},
        ["SINGLELINE: parseOptions 'SQUASH' is not a Kinesis Agent option; ignored",
         "SINGLELINE: unknown parameter 'extra'; ignored"])
    assert from_agent_option({"optionName": "CSVTOJSON", "customFieldNames": ["a"], "delimiter": "|"}) == (
        {"type": "csv_to_json", "field_names": ["a"], "delimiter": "|"},
        ["CSVTOJSON: delimiter '|' is a regular-expression metacharacter, which Kinesis Agent did not split on "
         "as a character; csv_to_json splits on the character itself"])
    refusals = {
        "ADDEC2METADATA": "ADDEC2METADATA: EC2 instance metadata is not looked up; use add_metadata",
        "ADDBRACKETS": "ADDBRACKETS: no equivalent option; wrap records in a transform",
        "USINGPLUGGIN": "USINGPLUGGIN: Java converter classes cannot run here; port the class to a Python transform",
        "NOPE": "unknown optionName 'NOPE'",
    }
    for name, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            from_agent_option({"optionName": name})
    with pytest.raises(ValueError, match=r"^CSVTOJSON: delimiter '\\\\s\+' is a regular expression; csv_to_json takes one character$"):
        from_agent_option({"optionName": "CSVTOJSON", "customFieldNames": ["a"], "delimiter": "\\s+"})
    with pytest.raises(ValueError, match=r"^CSVTOJSON: field_names: Input should be a valid list$"):
        from_agent_option({"optionName": "CSVTOJSON"})
    with pytest.raises(ValueError, match=r"^LOGTOJSON: match_pattern has 1 capturing group but field_names has 2 names$"):
        from_agent_option({"optionName": "LOGTOJSON", "logFormat": "SYSLOG", "matchPattern": "(a)", "customFieldNames": ["a", "b"]})
    with pytest.raises(ValueError, match=r"^LOGTOJSON: logFormat must be one of COMMONAPACHELOG, .*, got 'JSON'$"):
        from_agent_option({"optionName": "LOGTOJSON", "logFormat": "JSON"})
