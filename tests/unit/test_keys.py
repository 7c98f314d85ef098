"""Tests for firehose.keys: Firehose's S3 prefixes, error prefixes and object names."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from firehose.keys import (
    MAX_EVALUATED_PREFIX_LENGTH,
    PrefixError,
    evaluate_error_prefix,
    evaluate_prefix,
    java_datetime_format,
    object_name,
    random_object_suffix,
    validate_prefixes,
)
from support import unavailable

WHEN = datetime(2024, 5, 1, 13, 55, 9, 123456, tzinfo=UTC)
RANDOM_STRING = re.compile(r"[0-9a-f]{11}")


def rng(seed: int = 42) -> random.Random:
    return random.Random(seed)


# --- evaluate_prefix ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", "2024/05/01/13/"),
        ("logs", "logs2024/05/01/13/"),  # plain concatenation, as Firehose does
        ("logs/", "logs/2024/05/01/13/"),
        ("a/b/c/", "a/b/c/2024/05/01/13/"),
        ("!{timestamp:yyyy-MM-dd}/hour=!{timestamp:HH}/", "2024-05-01/hour=13/"),
        ("!{timestamp:yyyy}", "2024"),  # has a timestamp, so no default appended
        ("year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/", "year=2024/month=05/day=01/"),
        ("dt=!{timestamp:yyyy'-'MM'-'dd}/h=!{timestamp:HH}/", "dt=2024-05-01/h=13/"),
        ("!{timestamp:'year='yyyy'/month='MM}/", "year=2024/month=05/"),
        ("!{timestamp:hh 'o''clock' a}", "01 o'clock PM"),
        ("!{timestamp:''yyyy''}", "'2024'"),
        ("!{timestamp:yyyy/DDD/}", "2024/122/"),
        ("x/!{timestamp:yyyy[-MM]}/", "x/2024-05/"),
        ("a}b/", "a}b/2024/05/01/13/"),  # a lone } or ! is ordinary text
        ("wow!/", "wow!/2024/05/01/13/"),
    ],
)
def test_evaluate_prefix(prefix: str, expected: str) -> None:
    assert evaluate_prefix(prefix, WHEN, rng()) == expected


def test_documentation_examples() -> None:
    # Firehose guide, "Custom Prefixes for Amazon S3 Objects" (10:30 UTC, Aug 27 2018, and Jul 6 2018 23h).
    august = datetime(2018, 8, 27, 10, 30, tzinfo=UTC)
    out = evaluate_prefix(
        "myFirehose/DeliveredYear=!{timestamp:yyyy}/anyMonth/rand=!{firehose:random-string}", august, rng()
    )
    assert out.startswith("myFirehose/DeliveredYear=2018/anyMonth/rand=")
    assert RANDOM_STRING.fullmatch(out.rsplit("=", 1)[1])
    assert (
        evaluate_error_prefix(
            "",
            "myFirehoseFailures/!{firehose:error-output-type}/!{timestamp:yyyy}/anyMonth/!{timestamp:dd}",
            august,
            rng(),
            "processing-failed",
        )
        == "myFirehoseFailures/processing-failed/2018/anyMonth/27"
    )
    july = datetime(2018, 7, 6, 23, 1, tzinfo=UTC)
    hive = "year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/hour=!{timestamp:HH}/"
    assert evaluate_prefix(f"myPrefix/{hive}", july, rng()) == "myPrefix/year=2018/month=07/day=06/hour=23/"
    error = f"myErrorPrefix/{hive}!{{firehose:error-output-type}}"
    assert (
        evaluate_error_prefix(f"myPrefix/{hive}", error, july, rng(), "processing-failed")
        == "myErrorPrefix/year=2018/month=07/day=06/hour=23/processing-failed"
    )


def test_all_timestamps_use_the_same_instant() -> None:
    out = evaluate_prefix("!{timestamp:HH:mm:ss.SSSSSS}/!{timestamp:HH:mm:ss.SSSSSS}/", WHEN, rng())
    first, second, _ = out.split("/")
    assert first == second == "13:55:09.123456"


def test_timestamp_uses_the_given_wall_clock() -> None:
    tokyo = WHEN.astimezone(timezone(timedelta(hours=9)))
    assert evaluate_prefix("", tokyo, rng()) == "2024/05/01/22/"
    naive = WHEN.replace(tzinfo=None)
    assert evaluate_prefix("", naive, rng()) == "2024/05/01/13/"


def test_random_string_is_11_hex_chars_new_per_occurrence() -> None:
    out = evaluate_prefix("!{firehose:random-string}/!{firehose:random-string}/x/", WHEN, rng())
    first, second, rest = out.split("/", 2)
    assert RANDOM_STRING.fullmatch(first) and RANDOM_STRING.fullmatch(second)
    assert first != second
    assert rest == "x/2024/05/01/13/"  # random strings don't count as a timestamp


def test_random_string_is_deterministic_for_a_seeded_rng() -> None:
    prefix = "p/!{firehose:random-string}/!{firehose:random-string}/"
    assert evaluate_prefix(prefix, WHEN, rng(1)) == evaluate_prefix(prefix, WHEN, rng(1))
    assert evaluate_prefix(prefix, WHEN, rng(1)) != evaluate_prefix(prefix, WHEN, rng(2))


def test_random_strings_vary_across_many_draws() -> None:
    generator = rng(3)
    draws = {evaluate_prefix("!{firehose:random-string}", WHEN, generator)[:11] for _ in range(500)}
    assert len(draws) == 500
    assert set("".join(draws)) == set("0123456789abcdef")


def test_partition_keys() -> None:
    prefix = "cid=!{partitionKeyFromQuery:customer_id}/dev=!{partitionKeyFromLambda:device}/"
    keys = {"customer_id": "1234", "device": "mobile"}
    assert evaluate_prefix(prefix, WHEN, rng(), partition_keys=keys) == "cid=1234/dev=mobile/2024/05/01/13/"


@pytest.mark.parametrize("keys", [None, {}, {"other": "1"}])
def test_missing_partition_key_fails_evaluation(keys: dict[str, str] | None) -> None:
    with pytest.raises(PrefixError, match="partition key 'customer_id'"):
        evaluate_prefix("cid=!{partitionKeyFromQuery:customer_id}/", WHEN, rng(), partition_keys=keys)


def test_error_output_type_needs_a_type() -> None:
    prefix = "e/!{firehose:error-output-type}/"
    assert evaluate_prefix(prefix, WHEN, rng(), error_output_type="processing-failed") == (
        "e/processing-failed/2024/05/01/13/"
    )
    with pytest.raises(PrefixError, match="error-output-type"):
        evaluate_prefix(prefix, WHEN, rng())


def test_evaluated_prefix_over_512_chars_is_rejected() -> None:
    literal = "a" * MAX_EVALUATED_PREFIX_LENGTH
    # A 512-character literal is fine even though the implicit timestamp then passes 512.
    assert evaluate_prefix(literal, WHEN, rng()) == literal + "2024/05/01/13/"
    with pytest.raises(PrefixError, match="512"):
        evaluate_prefix(literal + "b", WHEN, rng())
    with pytest.raises(PrefixError, match="512"):
        evaluate_prefix("a" * 505 + "!{timestamp:yyyy-MM-dd}", WHEN, rng())  # 505 + 10 characters
    with pytest.raises(PrefixError, match="512"):
        evaluate_prefix("!{timestamp:yyyy}" + "a" * 510, WHEN, rng())  # passes validation, not evaluation
    with pytest.raises(PrefixError, match="512"):
        evaluate_prefix("k=!{partitionKeyFromQuery:k}/", WHEN, rng(), partition_keys={"k": "v" * 600})


def test_evaluate_rejects_malformed_expressions() -> None:
    with pytest.raises(PrefixError, match=r"The sequence !\{ can only appear"):
        evaluate_prefix("a!{b", WHEN, rng())


# --- evaluate_error_prefix ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "error_output_prefix", "expected"),
    [
        ("", None, "processing-failed/2024/05/01/13/"),
        ("", "", "processing-failed/2024/05/01/13/"),
        ("logs/", None, "logs/processing-failed/2024/05/01/13/"),
        ("logs", None, "logsprocessing-failed/2024/05/01/13/"),
        ("logs/", "errors/", "errors/2024/05/01/13/"),
        ("logs/", "errors/!{firehose:error-output-type}/", "errors/processing-failed/2024/05/01/13/"),
        (
            "!{timestamp:yyyy}/",
            "err/!{firehose:error-output-type}/!{timestamp:yyyy/MM}/",
            "err/processing-failed/2024/05/",
        ),
        (
            "x/",
            "!{firehose:error-output-type}/!{firehose:error-output-type}/",
            "processing-failed/processing-failed/2024/05/01/13/",
        ),
    ],
)
def test_evaluate_error_prefix(prefix: str, error_output_prefix: str | None, expected: str) -> None:
    assert evaluate_error_prefix(prefix, error_output_prefix, WHEN, rng(), "processing-failed") == expected


def test_error_prefix_other_types() -> None:
    for kind in ("format-conversion-failed", "AmazonOpenSearchService-failed", "http-endpoint-failed"):
        assert evaluate_error_prefix("p/", None, WHEN, rng(), kind) == f"p/{kind}/2024/05/01/13/"


def test_error_prefix_random_string() -> None:
    out = evaluate_error_prefix(
        "", "e/!{firehose:error-output-type}/!{firehose:random-string}/", WHEN, rng(), "processing-failed"
    )
    _, kind, random_part, rest = out.split("/", 3)
    assert kind == "processing-failed" and RANDOM_STRING.fullmatch(random_part)
    assert rest == "2024/05/01/13/"


def test_error_prefix_null_with_expression_prefix_is_rejected() -> None:
    with pytest.raises(PrefixError, match="ErrorOutputPrefix can't be null when Prefix contains expressions"):
        evaluate_error_prefix("!{timestamp:yyyy}/", None, WHEN, rng(), "processing-failed")


def test_error_prefix_ignores_partition_keys() -> None:
    out = evaluate_error_prefix(
        "k=!{partitionKeyFromQuery:k}/",
        "e/!{firehose:error-output-type}/",
        WHEN,
        rng(),
        "processing-failed",
        partition_keys={"k": "v"},
    )
    assert out == "e/processing-failed/2024/05/01/13/"


# --- validate_prefixes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "error_output_prefix", "dynamic"),
    [
        ("", None, False),
        ("logs/", None, False),
        ("logs/", "errors/", False),  # literal error prefix: no error-output-type needed
        ("!{timestamp:yyyy}/", "e/!{firehose:error-output-type}/", False),
        ("!{firehose:random-string}/", "!{firehose:error-output-type}/!{firehose:random-string}/", False),
        ("c=!{partitionKeyFromQuery:c}/", "e/!{firehose:error-output-type}/", True),
        ("c=!{partitionKeyFromLambda:c}/!{timestamp:yyyy}/", "!{firehose:error-output-type}/", True),
        ("a" * 512, None, False),
        ("!{timestamp:yyyy}" + "a" * 510, "!{firehose:error-output-type}", False),  # checked when evaluated
    ],
)
def test_valid_prefixes(prefix: str, error_output_prefix: str | None, dynamic: bool) -> None:
    validate_prefixes(prefix, error_output_prefix, dynamic_partitioning=dynamic)


@pytest.mark.parametrize(
    ("prefix", "error_output_prefix", "dynamic", "message"),
    [
        # !{ only as a well-formed expression
        ("a!{b", None, False, r"The sequence !\{ can only appear in !\{namespace:value\} expressions"),
        ("!{timestamp}", "x", False, r"The sequence !\{ can only appear"),
        ("!{!{timestamp:yyyy}}", "x", False, r"The sequence !\{ can only appear"),
        ("ok/", "e!{", False, r"The sequence !\{ can only appear.*ErrorOutputPrefix"),
        # namespaces and values
        ("!{foo:bar}", "x", False, r"Unknown namespace 'foo' in Prefix expression !\{foo:bar\}"),
        ("!{Timestamp:yyyy}", "x", False, "Unknown namespace 'Timestamp'"),
        ("!{firehose:uuid}", "x", False, "Unknown value 'uuid' for the firehose namespace"),
        ("!{timestamp:}", "x", False, "has no value"),
        ("!{timestamp:yyyy-ii}", "x", False, r"Invalid DateTimeFormatter pattern in Prefix .*'i'"),
        ("!{timestamp:'open}", "x", False, "incomplete string literal"),
        ("x", "!{firehose:error-output-type}!{timestamp:ddd}", False, "too many pattern letters"),
        # the error-output-type rules
        ("!{firehose:error-output-type}/", "e/!{firehose:error-output-type}", False, "Prefix can't contain"),
        (
            "!{timestamp:yyyy}/",
            None,
            False,
            "ErrorOutputPrefix can't be null when Prefix contains expressions",
        ),
        ("!{timestamp:yyyy}/", "", False, "ErrorOutputPrefix can't be null when Prefix contains expressions"),
        (
            "logs/",
            "errors/!{timestamp:yyyy}/",
            False,
            r"you must include at least one instance of !\{firehose:error-output-type\}",
        ),
        (
            "logs/",
            "errors/!{firehose:random-string}/",
            False,
            r"at least one instance of !\{firehose:error-output-type\}",
        ),
        # dynamic partitioning
        (
            "c=!{partitionKeyFromQuery:c}/",
            "!{firehose:error-output-type}/",
            False,
            "dynamic partitioning is enabled",
        ),
        ("c=!{partitionKeyFromLambda:c}/", "!{firehose:error-output-type}/", False, "dynamic partitioning"),
        ("!{timestamp:yyyy}/", "!{firehose:error-output-type}/", True, "must contain at least one"),
        ("c=!{partitionKeyFromQuery:c}/", None, True, "ErrorOutputPrefix is required"),
        (
            "c=!{partitionKeyFromQuery:c}/",
            "!{firehose:error-output-type}/!{partitionKeyFromQuery:c}/",
            True,
            "ErrorOutputPrefix can't contain !\\{partitionKeyFromQuery",
        ),
        # lengths
        ("a" * 1025, None, False, "Member must have length less than or equal to 1024"),
        ("logs/", "a" * 1025, False, "'ErrorOutputPrefix' failed to satisfy constraint"),
        ("a" * 513, None, False, "Prefix can't be greater than 512 characters"),
        ("!{timestamp:yyyy}" + "a" * 600, "!{firehose:error-output-type}", False, "greater than 512"),
        ("logs/", "!{firehose:error-output-type}" + "e" * 600, False, "ErrorOutputPrefix can't be greater"),
    ],
)
def test_invalid_prefixes(prefix: str, error_output_prefix: str | None, dynamic: bool, message: str) -> None:
    with pytest.raises(PrefixError, match=message):
        validate_prefixes(prefix, error_output_prefix, dynamic_partitioning=dynamic)


def test_prefix_error_is_a_value_error() -> None:
    assert issubclass(PrefixError, ValueError)


# --- object names ---------------------------------------------------------------------------------


def test_object_name_matches_the_spec_example() -> None:
    assert (
        object_name("mystream", 1, WHEN, "a9fa96af-e4e4-409f-bac3-1f804714faaa", ".gz")
        == "mystream-1-2024-05-01-13-55-09-a9fa96af-e4e4-409f-bac3-1f804714faaa.gz"
    )


def test_object_name_pads_fields_and_allows_no_extension() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert object_name("s", 12, when, "u", "") == "s-12-2024-01-02-03-04-05-u"


def test_full_key() -> None:
    generator = rng(7)
    key = evaluate_prefix("logs/", WHEN, generator) + object_name(
        "mystream", 1, WHEN, random_object_suffix(generator), ".snappy"
    )
    assert re.fullmatch(
        r"logs/2024/05/01/13/mystream-1-2024-05-01-13-55-09-"
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.snappy",
        key,
    )


def test_random_object_suffix_is_a_uuid4() -> None:
    suffix = random_object_suffix(rng())
    assert len(suffix) == 36
    parsed = uuid.UUID(suffix)
    assert str(parsed) == suffix
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_random_object_suffix_is_deterministic_for_a_seeded_rng() -> None:
    assert random_object_suffix(rng(1)) == random_object_suffix(rng(1))
    assert random_object_suffix(rng(1)) != random_object_suffix(rng(2))
    generator = rng(1)
    assert random_object_suffix(generator) != random_object_suffix(generator)


# --- java_datetime_format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "pattern", "expected"),
    [
        (
            datetime(2024, 9, 3, 7, 5, 9, 123456, tzinfo=UTC),
            "yyyy uuuu yy y MM M MMM MMMM MMMMM dd d D DDD DD E EEE EEEE EEEEE a HH H hh h kk k KK K mm m ss s "
            "S SSS SSSSSSSSS Q QQQ QQQQ YYYY ww w X x Z",
            "2024 2024 24 2024 09 9 Sep September S 03 3 247 247 247 Tue Tue Tuesday T AM 07 7 07 7 07 7 07 7 "
            "05 5 09 9 1 123 123456000 3 Q3 3rd quarter 2024 36 36 Z +00 +0000",
        ),
        (datetime(2024, 1, 5, tzinfo=UTC), "D DD DDD k K h a", "5 05 005 24 0 12 AM"),
        (datetime(2024, 5, 1, 13, 55, 9, tzinfo=UTC), "h hh a K", "1 01 PM 1"),
        # US week rules: the week holding January 1st is week 1 of the new week-based year.
        (datetime(2020, 12, 31, tzinfo=UTC), "YYYY w yyyy", "2021 1 2020"),
        (datetime(2024, 12, 29, tzinfo=UTC), "YYYY w ww yyyy E", "2025 1 01 2024 Sun"),
        (
            datetime(2024, 5, 1, 13, 55, 9, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "X XX XXX x xxx Z ZZZZ ZZZZZ",
            "+0530 +0530 +05:30 +0530 +05:30 +0530 GMT+05:30 +05:30",
        ),
        (
            datetime(2024, 5, 1, 13, 55, 9, tzinfo=timezone(timedelta(hours=-8))),
            "X XX XXX x xxx Z ZZZZ ZZZZZ",
            "-08 -0800 -08:00 -08 -08:00 -0800 GMT-08:00 -08:00",
        ),
        (WHEN, "X XX XXX x xx xxx Z ZZZZ ZZZZZ", "Z Z Z +00 +0000 +00:00 +0000 GMT Z"),
        (WHEN, "yyyy-MM-dd'T'HH:mm:ss.SSSXXX", "2024-05-01T13:55:09.123Z"),
        (WHEN, "'quoted ''text'' with yyyy'", "quoted 'text' with yyyy"),
        (WHEN, "''''", "'"),
        (WHEN, "[yyyy][-MM[-dd]]", "2024-05-01"),
        (WHEN, "yyyy/MM/dd/HH/", "2024/05/01/13/"),
        (WHEN, "-_=./ !", "-_=./ !"),
    ],
)
def test_java_datetime_format(when: datetime, pattern: str, expected: str) -> None:
    assert java_datetime_format(pattern, when) == expected


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("dd]", "without a previous"),
        ("{yyyy}", "reserved"),
        ("yyyy#", "reserved"),
        ("'abc", "incomplete string literal"),
        ("ddd", "too many pattern letters"),
        ("HHH", "too many pattern letters"),
        ("aa", "too many pattern letters"),
        ("MMMMMM", "too many pattern letters"),
        ("SSSSSSSSSS", "too many pattern letters"),
        ("G", "unsupported pattern letter 'G'"),
        ("VV", "unsupported pattern letter 'V'"),
        ("z", "unsupported pattern letter 'z'"),
        ("i", "unsupported pattern letter 'i'"),
    ],
)
def test_java_datetime_format_rejects(pattern: str, message: str) -> None:
    with pytest.raises(PrefixError, match=message):
        java_datetime_format(pattern, WHEN)


# --- java.time itself as the oracle (optional: needs a JDK) ---------------------------------------

_JAVA_FORMATTER = """
import java.io.*;
import java.time.*;
import java.time.format.*;
import java.util.Locale;

/** stdin lines "<epoch micros>\\t<offset seconds>\\t<pattern>"; prints each formatted, or ERR. */
public class FormatOracle {
    public static void main(String[] args) throws IOException {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, "UTF-8"));
        for (String line; (line = in.readLine()) != null; ) {
            String[] f = line.split("\\t", 3);
            ZonedDateTime t = Instant.ofEpochSecond(0, Long.parseLong(f[0]) * 1000L)
                .atZone(ZoneOffset.ofTotalSeconds(Integer.parseInt(f[1])));
            try {
                System.out.println(DateTimeFormatter.ofPattern(f[2], Locale.US).format(t));
            } catch (RuntimeException e) {
                System.out.println("ERR");
            }
        }
    }
}
"""

_ORACLE_PATTERNS = [
    "yyyy/MM/dd/HH/",
    "y yy yyy yyyyy uuuu u YYYY YY Y",
    "M MM MMM MMMM MMMMM L LL LLL LLLL",
    "d dd D DD DDD w ww",
    "E EE EEE EEEE EEEEE a",
    "H HH h hh k kk K KK m mm s ss",
    "S SS SSS SSSS SSSSSS SSSSSSSSS",
    "q qq qqq qqqq Q QQ QQQ QQQQ QQQQQ",
    "X XX XXX XXXX XXXXX x xx xxx xxxx xxxxx Z ZZ ZZZ ZZZZ ZZZZZ",
    "yyyy-MM-dd'T'HH:mm:ss.SSSXXX",
    "'lit''eral' '' '''' yyyy'/'",
    "[yyyy][-MM[-dd]]",
    "ddd",
    "HHH",
    "aa",
    "EEEEEE",
    "'open",
    "yyyy]",
    "{",
    "#",
]


def test_java_datetime_format_agrees_with_java_time(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not (shutil.which("java") and shutil.which("javac")):
        unavailable("needs a JDK (apt-get install default-jdk-headless)")
    workdir = tmp_path_factory.mktemp("format-oracle")
    (workdir / "FormatOracle.java").write_text(_JAVA_FORMATTER)
    subprocess.run(["javac", "-d", str(workdir), str(workdir / "FormatOracle.java")], check=True)

    generator = rng(2024)
    offsets = [
        0,
        9 * 3600,
        -5 * 3600,
        5 * 3600 + 1800,
        -(9 * 3600 + 1800),
        14 * 3600,
        5 * 3600 + 45 * 60 + 12,
    ]
    lines, expected = [], []
    for i in range(300):
        instant = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(
            seconds=generator.randrange(60 * 365 * 86400), microseconds=generator.randrange(10**6)
        )
        offset = offsets[i % len(offsets)]
        local = instant.astimezone(timezone(timedelta(seconds=offset)))
        micros = (instant - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        for pattern in _ORACLE_PATTERNS:
            lines.append(f"{micros}\t{offset}\t{pattern}")
            try:
                expected.append(java_datetime_format(pattern, local))
            except PrefixError:
                expected.append("ERR")
    result = subprocess.run(
        ["java", "-cp", str(workdir), "FormatOracle"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    mismatches = [
        (line, ours, theirs)
        for line, ours, theirs in zip(lines, expected, result.stdout.splitlines(), strict=True)
        if ours != theirs
    ]
    assert mismatches == []
