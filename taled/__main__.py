"""``taled`` / ``python -m taled``: run the daemon in the foreground.

Exit codes: 0 stopped cleanly; 1 start-up failed (model, store, socket);
2 invalid configuration or arguments; 3 another daemon already owns the socket.

Everything the daemon writes is private to its user whatever umask it inherits
(the umask is set to 077 first thing); the log goes to stderr, or with
``--log-file`` to a file the daemon rotates itself (taled/daemon/logs.py).

``--print-config`` prints the effective settings as TOML and exits: each value with
a comment saying where it came from (``default``, ``file PATH``, ``env TALE_...``),
secrets as ``"***"``. It starts nothing and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio

from taled import __version__, paths
from taled.errors import AlreadyRunning, ConfigError, TaleError

if TYPE_CHECKING:
    from taled.settings import Settings, SettingSources

__all__ = ["EXIT_ALREADY_RUNNING", "EXIT_CONFIG", "EXIT_STARTUP", "main"]

EXIT_STARTUP = 1
EXIT_CONFIG = 2
EXIT_ALREADY_RUNNING = 3


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load settings and serve until stopped."""
    # Before any file is created: the database, the log and the checkpoints hold
    # prompts and answers, so they are 0600 (directories 0700) for every umask.
    os.umask(0o077)
    parser = argparse.ArgumentParser(prog="taled", description="tale's daemon")
    parser.add_argument("--version", action="version", version=f"taled {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file, which must exist (default: {paths.config_file()}, if it exists)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="write the log to this file, rotated by size (default: stderr)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML, each with where it came from "
        "(default, the config file, a TALE_* variable), and exit",
    )
    args = parser.parse_args(argv)

    if args.config is not None and not args.config.exists():
        # The default file is optional; one named on the command line is meant to be read.
        print(f"taled: --config {args.config}: no such file", file=sys.stderr)
        return EXIT_CONFIG
    from taled.settings import SettingSources, load_settings

    # Absolute, so the printed sources name the file wherever they are read.
    config_file = (args.config or paths.config_file()).absolute()
    try:
        settings = load_settings(config_file)
        paths.socket_path()
    except ConfigError as exc:
        print(f"taled: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except paths.PathError as exc:
        print(f"taled: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        text = render_config(settings, SettingSources(config_file), config_file)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            # `taled --print-config | head` closed the pipe: what was wanted was printed.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.log_file is not None and not args.log_file.is_absolute():
        print(f"taled: --log-file {args.log_file} must be an absolute path", file=sys.stderr)
        return EXIT_CONFIG
    from taled.daemon.logs import setup_logging

    try:
        repeats = setup_logging(settings.daemon, args.log_file)
    except OSError as exc:
        print(f"taled: cannot open the log file {args.log_file}: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    from taled.app import App

    log = logging.getLogger("taled")
    spin_threads_as_set(settings, os.environ)
    try:
        anyio.run(App(settings).serve)
    except AlreadyRunning as exc:
        log.error("%s", exc.message)
        return EXIT_ALREADY_RUNNING
    except TaleError as exc:
        log.error("start-up failed: %s", exc.message)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    finally:
        for line in repeats.pending():
            log.warning("%s", line)
    return 0


def spin_threads_as_set(settings: Settings, environ: MutableMapping[str, str]) -> None:
    """Tell libgomp how long idle llama.cpp threads spin (LlamaCppSettings.omp_spin_count).

    It reads GOMP_SPINCOUNT once, when llama.cpp loads with the first model, so this runs
    before; a value already in the environment wins."""
    spin = settings.models.llamacpp.omp_spin_count
    if spin >= 0:
        environ.setdefault("GOMP_SPINCOUNT", str(spin))


# -- --print-config ----------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MASK = '"***"'


def render_config(settings: Settings, sources: SettingSources, config_file: Path) -> str:
    """The effective settings as TOML, each value followed by ``# <where it came from>``.

    Tables come in the settings model's order; a non-empty dict setting is a table of
    its own so that each of its entries carries its source too. The comments are
    comments, so the text loads with tomllib as it is.
    """
    from taled.settings import is_secret

    used = (
        f"{config_file}"
        if sources.config_file is not None
        else f"none ({config_file} does not exist)"
    )
    lines = [
        "# taled's effective configuration (taled --print-config).",
        "# After each value: where it came from: default, file PATH, or env VARIABLE.",
        f"# Config file: {used}.",
        '# Secrets (keys, tokens, passwords, and URL passwords) are shown as "***".',
    ]

    def table(prefix: tuple[str, ...], values: dict[str, Any]) -> None:
        leaves = [(k, v) for k, v in values.items() if not (isinstance(v, dict) and v)]
        tables = [(k, v) for k, v in values.items() if isinstance(v, dict) and v]
        if prefix and leaves:
            lines.extend(["", f"[{'.'.join(_key(p) for p in prefix)}]"])
        for key, value in leaves:
            origin = sources.origin((*prefix, key))
            if value is None:
                lines.append(f"# {_key(key)} is unset  # {origin}")
                continue
            shown = _MASK if is_secret(key, value) else _toml_value(value)
            lines.append(f"{_key(key)} = {shown}  # {origin}")
        for key, value in tables:
            table((*prefix, key), value)

    table((), settings.model_dump())
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _toml_string(name)


def _toml_string(text: str) -> str:
    # JSON's string escapes are TOML's, except that TOML wants DEL escaped too (and
    # ensure_ascii=False keeps astral characters whole: TOML rejects surrogate escapes).
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    from pydantic import SecretStr
    from pydantic_core import to_jsonable_python

    if isinstance(value, SecretStr):
        return _MASK
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(_without_url_password(value))
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return _toml_value(to_jsonable_python(value))


def _without_url_password(text: str) -> str:
    """``http://me:pw@host`` as ``http://me:***@host``: a server's password often rides
    in its URL."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.password:
        return text
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}").geturl()


if __name__ == "__main__":
    sys.exit(main())
