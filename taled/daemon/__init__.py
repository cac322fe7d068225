"""The daemon's face: the Unix socket, the MCP server on it, systemd
notifications and the daemon's logging."""
