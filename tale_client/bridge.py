"""``tale mcp``: copy newline-delimited JSON-RPC between stdio and the daemon's socket.

Editors launch MCP servers as commands that speak on stdin/stdout; this bridge
makes the daemon one of those, byte for byte, with no parsing in between.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from pathlib import Path

from tale_client.rpc import DaemonUnreachable

__all__ = ["run_bridge"]

_CHUNK = 65536


def run_bridge(path: Path) -> None:
    """Relay stdin → socket and socket → stdout until either side closes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise DaemonUnreachable(f"no daemon is listening on {path} ({exc})") from None
    stdin = sys.stdin.buffer.fileno()
    stdout = sys.stdout.buffer.fileno()

    def upstream() -> None:
        try:
            while chunk := os.read(stdin, _CHUNK):
                sock.sendall(chunk)
        except OSError:
            pass
        finally:
            # Tell the daemon we are done sending; answers in flight still arrive.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True, name="stdin→socket").start()
    try:
        while chunk := sock.recv(_CHUNK):
            view = memoryview(chunk)
            while view:
                written = os.write(stdout, view)
                view = view[written:]
    except OSError:
        pass
    finally:
        sock.close()
