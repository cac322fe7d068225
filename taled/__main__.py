"""``taled`` / ``python -m taled``: run the daemon in the foreground.

Exit codes: 0 stopped cleanly; 1 start-up failed (model, store, socket);
2 invalid configuration or arguments; 3 another daemon already owns the socket.
"""

from __future__ import annotations

import argparse
import logging
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
    parser = argparse.ArgumentParser(prog="taled", description="tale's daemon")
    parser.add_argument("--version", action="version", version=f"taled {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default: {paths.config_file()})",
    )
    args = parser.parse_args(argv)

    from taled.settings import load_settings

    try:
        settings = load_settings(args.config or paths.config_file())
    except ConfigError as exc:
        print(f"taled: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.daemon.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from taled.app import App

    try:
        anyio.run(App(settings).serve)
    except AlreadyRunning as exc:
        logging.getLogger("taled").error("%s", exc.message)
        return EXIT_ALREADY_RUNNING
    except TaleError as exc:
        logging.getLogger("taled").error("start-up failed: %s", exc.message)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
