"""``taled`` / ``python -m taled``: run the daemon in the foreground.

Exit codes: 0 stopped cleanly; 1 start-up failed (model, store, socket);
2 invalid configuration or arguments; 3 another daemon already owns the socket.

Everything the daemon writes is private to its user whatever umask it inherits
(the umask is set to 077 first thing); the log goes to stderr, or with
``--log-file`` to a file the daemon rotates itself (taled/daemon/logs.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from taled import __version__, paths
from taled.errors import AlreadyRunning, ConfigError, TaleError

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
    args = parser.parse_args(argv)

    if args.config is not None and not args.config.exists():
        # The default file is optional; one named on the command line is meant to be read.
        print(f"taled: --config {args.config}: no such file", file=sys.stderr)
        return EXIT_CONFIG
    from taled.settings import load_settings

    try:
        settings = load_settings(args.config or paths.config_file())
        paths.socket_path()
    except ConfigError as exc:
        print(f"taled: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except paths.PathError as exc:
        print(f"taled: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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


if __name__ == "__main__":
    sys.exit(main())
