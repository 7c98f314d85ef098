#!/usr/bin/env bash
# Set up and run the whole test suite: installs the project with its test extras, the Debian
# package the snappy-java reader tests use and kinesalite (npm) for the Kinesis source tests,
# then lint, type check and pytest. The servers the tests need (moto S3 server, kinesalite, the
# daemon itself) are started and stopped by the test fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

# snappy-java (Debian's libsnappy-java) is the independent reader for Firehose's Snappy format;
# the JDK comes with the machine image. Install it when we can (root, apt available).
if [ ! -e /usr/share/java/snappy-java.jar ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q libsnappy-java >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsnappy-java >/dev/null 2>&1)) || \
     echo "note: libsnappy-java could not be installed; the snappy-java reader tests will skip" >&2
fi

# kinesalite (npm), the Kinesis Data Streams the Kinesis source tests read from, pinned by
# tests/kinesalite/package-lock.json. Without node those tests skip.
if [ ! -d tests/kinesalite/node_modules ] && command -v npm >/dev/null; then
    (cd tests/kinesalite && npm ci --no-audit --no-fund --loglevel=error) || \
        echo "note: kinesalite could not be installed; the Kinesis source tests will skip" >&2
fi

python3 -m ruff check firehose transforms destinations tests bench
python3 -m mypy
python3 -m pytest -q -p no:cacheprovider "$@"
