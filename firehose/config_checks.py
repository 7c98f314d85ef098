"""The checks ``firehose validate`` (and ``run``, and a reload) make beyond the file itself:
local Lambda handlers imported in a child process, inline and Avro-file schemas compiled. Config
loading records them as :class:`~firehose.config.RuntimeCheck` items with their file and line."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from firehose.config import (
    DEFAULT_CONFIG_NAME,
    ConfigError,
    DaemonConfig,
    RuntimeCheck,
    _deferred,
    load_config,
)
from firehose.yamlload import format_path


def config_checks(cfg: DaemonConfig) -> tuple[RuntimeCheck, ...]:
    """The deferred checks of the streams in ``cfg`` (a copy holding some of a file's streams
    gets theirs only, still pointing at their lines in the file)."""
    names = {s.name for s in cfg.streams}
    if cfg._checks is not None:
        return tuple(c for c in cfg._checks if c.stream in names)
    out = []  # a config built in code: no lines to point at
    for i, s in enumerate(cfg.streams):
        for kind, path, target in _deferred(s.processing, s.format, ("streams", i)):
            out.append(RuntimeCheck(kind, s.name, cfg.source, f"{cfg.source}: {format_path(path)}", target))
    return tuple(out)


def run_checks(
    checks: Sequence[RuntimeCheck], *, handler_timeout_secs: float | None = None, cwd: str | None = None
) -> list[str]:
    """Run deferred checks; returns their problems (``file:line: field: message``), in file order.

    Schemas are compiled here, in process (an Avro schema file is read). Handlers are imported in
    one child process, as the transformation workers would import them (see
    :func:`firehose.transforms.handler_check.check_local_handlers`); remote functions are not invoked.
    """
    from firehose.registry import CONVERTER, HANDLER_CHECK, HANDLER_IMPORT_TIMEOUT, load

    check_local_handlers = load(HANDLER_CHECK)
    HANDLER_IMPORT_TIMEOUT_SECS = load(HANDLER_IMPORT_TIMEOUT)

    handlers = [c.target for c in checks if c.kind == "handler"]
    failed: dict[str, str] = {}
    if handlers:
        timeout = HANDLER_IMPORT_TIMEOUT_SECS if handler_timeout_secs is None else handler_timeout_secs
        failed = check_local_handlers(handlers, timeout_secs=timeout)
    problems: list[str] = []
    for c in checks:
        if c.kind == "handler" and c.target in failed:
            problems.append(f"{c.where}: {failed[c.target]}{_module_hint(c, failed[c.target], cwd)}")
        elif c.kind == "schema":
            try:
                load(CONVERTER)(c.target)
            except Exception as exc:  # SchemaError mostly; pyarrow and fastavro raise their own types
                text = " ".join(str(exc).split())
                problems.append(f"{c.where}: schema does not compile: {text or type(exc).__name__}")
    return problems


def _module_hint(check: RuntimeCheck, problem: str, cwd: str | None) -> str:
    """Why a handler beside the config file is not found: handlers are imported from the working
    directory (and sys.path), as `firehose run` imports them, not from the config's directory."""

    if "ModuleNotFoundError" not in problem or check.file == DEFAULT_CONFIG_NAME:
        return ""
    spec = str(check.target)
    module = spec.partition(":")[0] if ":" in spec else spec.rpartition(".")[0]
    top = module.split(".")[0]
    cwd = os.path.realpath(cwd or os.getcwd())
    config_dir = os.path.realpath(os.path.dirname(check.file) or ".")
    if not top or config_dir == cwd:
        return ""
    if not (os.path.isfile(os.path.join(config_dir, top + ".py")) or os.path.isdir(os.path.join(config_dir, top))):
        return ""
    return (f" ({top!r} is in the config file's directory {config_dir}, but handlers are imported from "
            f"the working directory {cwd} and sys.path, as `firehose run` imports them: start firehose "
            f"in {config_dir} or add it to PYTHONPATH)")


def check_handlers(cfg: DaemonConfig, *, timeout_secs: float | None = None) -> list[str]:
    """Import every local Lambda handler of ``cfg``'s streams in one child process; returns the
    problems, each ``file:line: streams[i].processing[j].function: message``. Blocking."""
    return run_checks([c for c in config_checks(cfg) if c.kind == "handler"], handler_timeout_secs=timeout_secs)


def check_schemas(cfg: DaemonConfig) -> list[str]:
    """Compile the inline and Avro-file schemas of ``cfg``'s ``format:`` blocks; returns the
    problems, each ``file:line: field: message`` (Glue tables are not fetched)."""
    return run_checks([c for c in config_checks(cfg) if c.kind == "schema"])


def validate_file(
    path: str | None, env: Mapping[str, str] | None = None, *, handler_timeout_secs: float | None = None
) -> tuple[DaemonConfig | None, list[str]]:
    """Everything ``firehose validate`` checks: the file (every problem, not the first), then
    every local handler imported and every inline or file schema compiled, for each part that is
    valid. Returns the config (None when invalid) and the problems."""
    try:
        cfg: DaemonConfig | None = load_config(path, env)
        assert cfg is not None
        errors: list[str] = []
        checks = config_checks(cfg)
    except ConfigError as exc:
        cfg, errors, checks = None, list(exc.errors), exc.checks
    errors += run_checks(checks, handler_timeout_secs=handler_timeout_secs)
    return (cfg if not errors else None), errors
