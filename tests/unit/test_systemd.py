"""The systemd unit in config/systemd/: it verifies against the installed daemon, its sandbox rates
at most 3.0 in ``systemd-analyze security``, its sysusers.d snippet creates the user it runs as,
and its system-call filter leaves what the daemon and its Lambda worker processes need.

PID 1 is not systemd where these tests run, so the unit is never started here: the filter test
applies the unit's own SystemCallFilter=/SystemCallErrorNumber=/RestrictAddressFamilies= with
libseccomp, as systemd would, to a process that does the daemon's risky work.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, unavailable

SYSTEMD = ROOT / "config" / "systemd"
UNIT = SYSTEMD / "firehose.service"
DROP_IN = SYSTEMD / "firehose.service.d" / "paths.conf.example"
SYSUSERS = SYSTEMD / "firehose.sysusers"
INSTALLED = "/opt/firehose/bin/firehose"  # where docs/systemd.md installs the daemon
FIREHOSE = Path(sys.executable).parent / "firehose"  # this environment's own console script
MAX_EXPOSURE = 3.0


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin")  # PATH may lack /usr/bin
    if path is None:
        unavailable(f"{name} is not installed (Debian package systemd)")
    return path


def service_settings(text: str) -> list[tuple[str, str]]:
    """The ``Key=value`` lines of the [Service] section, in order (a key may repeat)."""
    out: list[tuple[str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def setting(name: str) -> list[str]:
    return [v for k, v in service_settings(UNIT.read_text()) if k == name]


def unit_copy(tmp_path: Path, *, drop_in: bool = False) -> Path:
    """The shipped unit with ExecStart=/ExecStartPre= pointing at this environment's firehose
    (verify checks that they are executables), optionally with the paths drop-in installed."""
    assert os.access(FIREHOSE, os.X_OK), f"{FIREHOSE} is not executable: is the project installed?"
    text = UNIT.read_text()
    for key in ("ExecStart", "ExecStartPre"):
        assert any(v.startswith(INSTALLED + " ") for v in setting(key)), f"{key}= does not run {INSTALLED}"
    copy = tmp_path / "firehose.service"
    copy.write_text(text.replace(INSTALLED, str(FIREHOSE)))
    if drop_in:
        (tmp_path / "firehose.service.d").mkdir()
        shutil.copy(DROP_IN, tmp_path / "firehose.service.d" / "paths.conf")
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("systemd-analyze"), "--no-pager", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("drop_in", [False, True], ids=["unit", "unit+paths-drop-in"])
def test_the_unit_verifies_without_a_complaint(tmp_path: Path, drop_in: bool) -> None:
    copy = unit_copy(tmp_path, drop_in=drop_in)
    result = analyze("verify", str(copy))
    # verify exits 0 on unknown keys or bad values (it only logs them), so its output is checked:
    # nothing may be said about our unit or drop-in (other units on the machine are not ours).
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "firehose" in line or str(tmp_path) in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@pytest.mark.parametrize("drop_in", [False, True], ids=["unit", "unit+paths-drop-in"])
def test_the_sandbox_rates_at_most_3_in_systemd_analyze_security(tmp_path: Path, drop_in: bool) -> None:
    result = analyze("security", "--offline=true", str(unit_copy(tmp_path, drop_in=drop_in)))
    if "offline" in result.stderr and "unrecognized" in result.stderr:
        unavailable("systemd-analyze is older than 250: no security --offline")
    found = re.search(r"Overall exposure level for firehose\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_the_sysusers_snippet_creates_the_user_and_group_the_unit_runs_as(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "usr/lib/sysusers.d").mkdir(parents=True)
    shutil.copy(SYSUSERS, tmp_path / "usr/lib/sysusers.d/firehose.conf")  # where the docs install it
    result = subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}", "firehose.conf"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    users = {f[0]: f for f in (line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines())}
    groups = {f[0]: f for f in (line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines())}
    [user], [group] = setting("User"), setting("Group")
    name, _, uid, gid, _, home, shell = users[user]
    assert int(uid) < 1000, "not a system user"
    assert groups[group][2] == gid
    assert home == "/var/lib/firehose" and setting("StateDirectory") == ["firehose"]
    assert shell.endswith("nologin")


def test_the_stop_timeout_outlasts_the_default_shutdown_timeout() -> None:
    from firehose.config import DaemonConfig

    [stop] = setting("TimeoutStopSec")
    assert stop.isdigit(), f"TimeoutStopSec={stop}: write plain seconds"
    assert int(stop) > DaemonConfig.model_fields["shutdown_timeout_secs"].default


# What the filter test runs: the unit's seccomp policy, then the daemon's riskiest work.
_FILTERED = r"""
import asyncio, ctypes, dataclasses, errno, json, os, socket, sys

policy = json.loads(sys.argv[1])
lib = ctypes.CDLL(policy["libseccomp"], use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

ALLOW, KILL_PROCESS, EQ, GE = 0x7FFF0000, 0x80000000, 4, 5
def refuse(e): return 0x00050000 | e
ctx = lib.seccomp_init(refuse(policy["errno"]) if policy["errno"] else KILL_PROCESS)
sock = lib.seccomp_syscall_resolve_name(b"socket")
for name in policy["allowed"]:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0 and not (nr == sock and policy["families"] is not None):
        assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
if policy["families"] is not None:  # RestrictAddressFamilies=: EAFNOSUPPORT for the others
    for family in range(64):
        action = ALLOW if family in policy["families"] else refuse(errno.EAFNOSUPPORT)
        assert lib.seccomp_rule_add_array(ctx, action, sock, 1, ctypes.byref(Cmp(0, EQ, family, 0))) == 0
    assert lib.seccomp_rule_add_array(ctx, refuse(errno.EAFNOSUPPORT), sock, 1,
                                      ctypes.byref(Cmp(0, GE, 64, 0))) == 0
assert lib.seccomp_load(ctx) == 0

# The filter is on: what it refuses is refused.
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
    sys.exit("AF_NETLINK was allowed")
except OSError:
    pass
try:
    os.sched_setaffinity(0, os.sched_getaffinity(0))  # @resources
    sys.exit("sched_setaffinity was allowed")
except PermissionError:
    pass

import numpy, pyarrow, uvloop  # numpy's OpenBLAS calls mbind (@resources) when it loads
from firehose.transforms.lambda_ import LambdaContext
from firehose.transforms.workers import WorkerPool

async def roundtrip(method):
    pool = WorkerPool("handlers.upper:handler", 1, 30, start_method=method, nice=10)  # setpriority refused
    await pool.start()
    try:
        event = {"records": [{"recordId": "1", "approximateArrivalTimestamp": 0, "data": "eyJuYW1lIjoiYSJ9"}]}
        out = await pool.call(event, dataclasses.asdict(LambdaContext.create("systemd-test")))
        return out["records"][0]["result"]
    finally:
        await pool.close()

results = {m: asyncio.run(roundtrip(m)) for m in ("spawn", "forkserver")}
with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
    s.bind(("::1" if socket.has_ipv6 else "127.0.0.1", 0))
    s.listen()
print(json.dumps(results))
"""


def syscall_group(analyze_path: str, names: list[str], seen: set[str]) -> set[str]:
    """The system calls a SystemCallFilter= value names, its @groups expanded as systemd does."""
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        listing = subprocess.run([analyze_path, "--no-pager", "syscall-filter", name], capture_output=True,
                                 text=True, check=True, timeout=60).stdout.splitlines()[1:]
        entries = [line.strip() for line in listing if line.strip() and not line.strip().startswith("#")]
        out |= syscall_group(analyze_path, entries, seen)
    return out


def test_the_syscall_filter_lets_the_daemon_and_its_lambda_workers_run() -> None:
    import json
    import socket

    libseccomp = ctypes.util.find_library("seccomp")
    if libseccomp is None:
        unavailable("libseccomp is not installed (Debian package libseccomp2, a dependency of systemd)")
    analyze_path = tool("systemd-analyze")
    allowed: set[str] = set()
    refused: set[str] = set()
    for value in setting("SystemCallFilter"):
        names = value.removeprefix("~").split()
        (refused if value.startswith("~") else allowed).update(syscall_group(analyze_path, names, set()))
    assert allowed, "SystemCallFilter= should start with an allow-list (@system-service)"
    [errno_name] = setting("SystemCallErrorNumber") or [""]
    families = [v.split() for v in setting("RestrictAddressFamilies")]
    policy = {
        "libseccomp": libseccomp,
        # systemd adds @default to an allow-list, then takes the ~ entries out
        "allowed": sorted((allowed | syscall_group(analyze_path, ["@default"], set())) - refused),
        "errno": getattr(__import__("errno"), errno_name) if errno_name else 0,
        "families": [getattr(socket, f) for f in families[-1]] if families else None,
    }
    result = subprocess.run([sys.executable, "-c", _FILTERED, json.dumps(policy)], capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    assert json.loads(result.stdout.splitlines()[-1]) == {"spawn": "Ok", "forkserver": "Ok"}


def test_memory_deny_write_execute_stays_off_for_jit_handlers() -> None:
    # numba and other JITs need writable+executable memory; the unit says so in a comment.
    assert setting("MemoryDenyWriteExecute") in ([], ["false"], ["no"])
