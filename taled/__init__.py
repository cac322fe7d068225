"""taled: tale's daemon (model pool, durable task queue, MCP server on a Unix socket)."""

__version__ = "0.1.0"
