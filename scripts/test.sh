#!/usr/bin/env bash
# Set up and run the whole test suite as a user installs the daemon:
#   1. a fresh virtualenv that cannot see the machine's packages (no system site-packages);
#   2. the project built as a wheel and installed from it (not editable), with its test extras;
#   3. the services and tools the tests use, installed where this machine can: PostgreSQL 15, the
#      JDK and snappy-java, systemd-analyze (Debian packages), kinesalite (npm, pinned by its lock
#      file);
#   4. ruff, mypy on the installed package, and pytest run so that the repository root is not on
#      sys.path (the tests import the installed firehose, never the source tree).
# With CI=true (as .ci/run sets it) a service that could not be installed fails its tests instead
# of skipping them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FIREHOSE_TEST_VENV:-$ROOT/build/test-venv}
PY=${PYTHON:-python3}

step() { printf '==> %s\n' "$*" >&2; }

step "fresh virtualenv at $VENV"
rm -rf "$VENV" "$ROOT/build/dist"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip

step "build the wheel and install it with the test extras"
"$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$ROOT/build/dist" "$ROOT"
WHEEL=$(ls "$ROOT"/build/dist/firehose-*.whl)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL[test]" 2> >(grep -v "is ignored: it is neither" >&2)

apt_install() {
    # Debian packages, when this is a root shell with apt; quiet unless it fails.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q "$@" >/dev/null 2>&1 || \
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$@" >/dev/null 2>&1; }
    else
        return 1
    fi
}

step "services: PostgreSQL 15, JDK + snappy-java, systemd-analyze, node + kinesalite, chromium, Go + AWS SDK v2, the JS SDK"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql-15 || echo "note: PostgreSQL could not be installed; the real-database tests will not run" >&2
fi
if ! command -v javac >/dev/null; then
    apt_install default-jdk-headless || echo "note: no JDK; the Java reader tests will not run" >&2
fi
if [ ! -e /usr/share/java/snappy-java.jar ]; then
    apt_install libsnappy-java || echo "note: libsnappy-java could not be installed; the snappy-java reader tests will not run" >&2
fi
if ! command -v systemd-analyze >/dev/null || ! command -v systemd-sysusers >/dev/null || [ ! -x /bin/kill ]; then
    apt_install systemd procps libseccomp2 || echo "note: systemd-analyze could not be installed; the unit tests will not run" >&2
fi
if ! command -v npm >/dev/null; then
    apt_install nodejs npm || echo "note: no node; the Kinesis source tests will not run" >&2
fi
if ! command -v chromium >/dev/null; then
    apt_install chromium || echo "note: chromium could not be installed; the status page browser test will not run" >&2
fi
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/aws/aws-sdk-go-v2/service/firehose ]; then
    apt_install golang-go golang-github-aws-aws-sdk-go-v2-dev || \
        echo "note: Go or the AWS SDK for Go v2 could not be installed; the Go SDK test will not run" >&2
fi
if [ ! -d tests/sdk/js/node_modules ] && command -v npm >/dev/null; then
    (cd tests/sdk/js && npm ci --no-audit --no-fund --loglevel=error) || \
        echo "note: the AWS SDK for JavaScript could not be installed; the JavaScript SDK test will not run" >&2
fi
if [ ! -d tests/kinesalite/node_modules ] && command -v npm >/dev/null; then
    (cd tests/kinesalite && npm ci --no-audit --no-fund --loglevel=error) || \
        echo "note: kinesalite could not be installed; the Kinesis source tests will not run" >&2
fi

export PATH="$VENV/bin:$PATH"
# No interpreter started by the tests puts its working directory (the repository root) on sys.path.
export PYTHONSAFEPATH=1

step "ruff"
ruff check firehose transforms destinations tests bench

step "mypy (on the installed package, under the names users import)"
# A copy of what the wheel installed, so mypy resolves every module by its installed name.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$ROOT/build/typecheck" && mkdir -p "$ROOT/build/typecheck"
cp -r "$SITE/firehose" "$ROOT/build/typecheck/"
find "$ROOT/build/typecheck" -name __pycache__ -prune -exec rm -rf {} +
(cd "$ROOT/build/typecheck" && mypy --config-file "$ROOT/pyproject.toml" firehose)

step "pytest"
python -m pytest -q -p no:cacheprovider "$@"
