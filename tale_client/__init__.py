"""tale's thin client: CLI, socket client and stdio bridge (standard library + typer)."""

__version__ = "0.1.0"
