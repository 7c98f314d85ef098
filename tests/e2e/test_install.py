"""The installed package as a user gets it: what the wheel installs, under which names, and the
journeys of a first-time user (the shipped example configs, a short Parquet delivery through the
console script, and unit-testing one's own transform in one's own repository).

scripts/test.sh (CI's command) runs this suite in a virtualenv it creates without system
site-packages, with the project installed from its built wheel. Under CI=true these tests also
check that this is so, so a run against an editable tree or the machine's packages cannot pass
for one against the wheel."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import orjson
import pytest

import firehose
from firehose import registry
from support import Daemon, daemon_config, local_objects, stream_config

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "firehose"


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH or PYTHONSAFEPATH from this test run."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def test_in_ci_the_suite_runs_against_the_built_wheel_in_an_isolated_venv() -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("a developer may run the suite against an editable install; CI=true checks the wheel")
    dist = importlib.metadata.distribution("firehose")
    direct_url = dist.read_text("direct_url.json")
    assert direct_url is None or not orjson.loads(direct_url).get("dir_info", {}).get("editable"), direct_url
    installed = Path(firehose.__file__).resolve().parent
    assert installed != (REPO / "firehose").resolve(), firehose.__file__
    assert installed.parent == Path(sysconfig.get_paths()["purelib"]).resolve(), firehose.__file__
    assert sys.prefix != sys.base_prefix, "not in a virtualenv"
    cfg = (Path(sys.prefix) / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg


def test_no_generic_top_level_names_are_importable() -> None:
    # The repository root is not on sys.path (tests/conftest.py), so a module still imported by its
    # old name would fail here instead of passing by accident.
    for name in ("transforms", "destinations"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable"
    files = [f for f in dist_files() if f.suffix == ".py"]
    if any(f.name.startswith("__editable__") for f in files):
        return  # an editable install lists only its finder; the wheel's file list is checked in CI
    assert {f.parts[0] for f in files} == {"firehose"}, "a module installed outside the firehose package"


def dist_files() -> list[Path]:
    return [Path(str(f)) for f in importlib.metadata.distribution("firehose").files or []
            if not str(f).startswith(("firehose-", "../"))]


def test_every_registry_import_string_resolves() -> None:
    targets = [*registry.BUILTIN_DESTINATIONS.values(), *registry.BUILTIN_SOURCES.values(),
               *registry.BUILTIN_PROCESSORS.values(), registry.PROCESSING_CHECK, registry.BACKUP_CONFIG,
               registry.PROCESSING_CHAIN, registry.FORMAT_CONFIG, registry.CONVERTER]
    for target in targets:
        assert target.startswith("firehose."), target
        assert registry.load(target) is not None, target


def test_no_module_is_importable_under_two_names() -> None:
    modules = all_modules()
    assert {"firehose.transforms.formats", "firehose.destinations.s3", "firehose.testing"} <= set(modules)
    for name in modules:
        importlib.import_module(name)
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path:
            by_file.setdefault(os.path.realpath(path), []).append(name)
    ours = {os.path.realpath(sys.modules[n].__file__ or "") for n in modules}
    twice = {f: names for f, names in by_file.items() if f in ours and len(names) > 1}
    assert twice == {}
    # One class object, whichever way it is reached.
    from firehose.destinations.s3 import S3DestinationConfig
    assert registry.destination_config_class("s3") is S3DestinationConfig


def all_modules() -> list[str]:
    """Every module of the package, walking each subpackage through its own __path__ (an editable
    install maps firehose.transforms and firehose.destinations to folders outside firehose/)."""
    seen: list[str] = []
    todo = ["firehose", "firehose.transforms", "firehose.destinations"]
    walked: set[str] = set()
    while todo:
        name = todo.pop()
        if name in walked:
            continue
        walked.add(name)
        pkg = importlib.import_module(name)
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            if info.name == "firehose.__main__":
                continue  # running it is `python -m firehose`; importing it would parse our argv
            if info.name not in seen:
                seen.append(info.name)
            if info.ispkg:
                todo.append(info.name)
    return seen


def test_every_package_of_the_repository_is_installed() -> None:
    """A package folder the wheel's package list forgets would pass an editable install and fail
    a user's: every folder with an __init__.py is importable under its installed name."""
    roots = {"firehose": "firehose", "transforms": "firehose.transforms", "destinations": "firehose.destinations"}
    for folder, name in roots.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(REPO / folder).parts
            module = ".".join((name, *rel))
            assert importlib.util.find_spec(module) is not None, f"{module} ({init.parent}) is not installed"


def test_version_matches_the_distribution() -> None:
    assert firehose.__version__ == importlib.metadata.version("firehose")


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "config" / "examples").glob("*.yaml")))
def test_every_shipped_example_validates_with_no_environment(example: str, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    res = subprocess.run([str(CLI), "validate", str(REPO / "config" / "examples" / example)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(REPO / "config" / "examples" / example) + ": OK")


def test_a_short_parquet_delivery_through_the_console_script(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    fmt = {"type": "parquet", "schema": {"columns": [{"name": "id", "type": "bigint"},
                                                     {"name": "name", "type": "string"}]}}
    s = stream_config("p", {"type": "local", "path": str(tmp_path / "out")},
                      buffering={"size_mib": 64, "interval_secs": 1}, format=fmt)
    d = Daemon(tmp_path, daemon_config(tmp_path, [s]), env={"PYTHONPATH": ""})
    d.command = [str(CLI), "run", "--config", str(d.config_path)]  # as a user runs it
    d.start()
    try:
        rows = [{"id": i, "name": f"n{i}"} for i in range(50)]
        d.firehose().put_record_batch(DeliveryStreamName="p",
                                      Records=[{"Data": orjson.dumps(r) + b"\n"} for r in rows])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not local_objects(tmp_path / "out"):
            time.sleep(0.2)
    finally:
        assert d.stop() == 0
    objects = local_objects(tmp_path / "out")
    assert len(objects) == 1 and next(iter(objects)).endswith(".parquet"), list(objects)
    path = next(p for p in (tmp_path / "out").rglob("*.parquet"))
    assert pq.read_table(path).to_pylist() == rows


def test_a_users_own_transforms_package_does_not_shadow_the_harness(tmp_path: Path) -> None:
    """The layout users copy: their own transforms/ package and tests/ beside it, nothing else
    installed. Their pytest run imports our harness from the installed package."""
    project = tmp_path / "my-pipeline"
    (project / "transforms").mkdir(parents=True)
    (project / "tests").mkdir()
    (project / "transforms" / "__init__.py").write_text("")
    (project / "transforms" / "enrich.py").write_text(textwrap.dedent('''
        import base64
        import json


        def handler(event, context):
            out = []
            for record in event["records"]:
                doc = json.loads(base64.b64decode(record["data"]))
                doc["enriched"] = True
                data = base64.b64encode(json.dumps(doc).encode()).decode()
                out.append({"recordId": record["recordId"], "result": "Ok", "data": data})
            return {"records": out}
    '''))
    (project / "tests" / "test_enrich.py").write_text(textwrap.dedent('''
        from firehose.testing import run_transform

        from transforms.enrich import handler


        def test_enrich():
            run = run_transform(handler, [{"user": 1}])
            assert [r.json() for r in run.ok] == [{"user": 1, "enriched": True}]


        def test_enrich_by_import_string():
            run = run_transform("transforms.enrich:handler", [{"user": 2}])
            assert [r.json() for r in run.ok] == [{"user": 2, "enriched": True}]
    '''))
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=project, capture_output=True, text=True, env=_user_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 passed" in res.stdout
