"""A small MCP client over the daemon's Unix socket, standard library only.

Importing the MCP SDK costs over a second, so the client speaks the wire
protocol itself: newline-delimited JSON-RPC 2.0, the ``initialize`` handshake,
then ``tools/call``. A refused call comes back as a result with ``isError`` and is
raised as the same ``RpcError`` a JSON-RPC error is.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tale_client import protocol

__all__ = ["PROTOCOL_VERSION", "Connection", "DaemonUnreachable", "RpcError", "tool_error"]

PROTOCOL_VERSION = "2025-11-25"


class RpcError(Exception):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def tool_error(name: str, result: dict[str, Any]) -> RpcError:
    """The RpcError a tools/call result with ``isError`` stands for.

    The daemon reports a refused call (no such task, bad arguments, a state that does
    not allow it) in the result, as MCP asks, with the JSON-RPC code it would have
    answered with in ``structuredContent.error``: callers see the same code and
    message either way, and so exit codes do not change."""
    texts = [c.get("text", "") for c in result.get("content") or [] if isinstance(c, dict)]
    structured = result.get("structuredContent")
    error = structured.get("error") if isinstance(structured, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), int):
        message = error.get("message")
        return RpcError(error["code"], str(message) if message else " ".join(texts))
    # Another server's tool error, or one without a code: an internal error.
    return RpcError(protocol.INTERNAL_ERROR, " ".join(texts) or f"{name} failed")


class DaemonUnreachable(Exception):
    """No daemon answers on the socket (or it hung up)."""


class Connection:
    """One MCP session with the daemon."""

    def __init__(self, path: Path, timeout: float | None = 30.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonUnreachable(f"no daemon is listening on {path} ({exc.strerror})") from None
        except OSError as exc:
            self._sock.close()
            raise DaemonUnreachable(f"cannot connect to {path}: {exc}") from None
        self._file = self._sock.makefile("rwb")
        self._next_id = 0
        self.server_info: dict[str, Any] = {}

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up."""
        try:
            self._file.close()
        finally:
            self._sock.close()

    def initialize(self, client_name: str = "tale", version: str = "0") -> dict[str, Any]:
        """The MCP handshake; returns the server's ``initialize`` result."""
        result = self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": client_name, "version": version},
            },
        )
        self.notify("notifications/initialized")
        self.server_info = result.get("serverInfo", {})
        return result

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification (no answer expected)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._send(message)

    def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its answer, handing notifications to ``on_notification``."""
        self._next_id += 1
        request_id = self._next_id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self._send(message)
        while True:
            reply = self._receive()
            if reply.get("id") == request_id or ("error" in reply and reply.get("id") is None):
                break
            if "method" in reply and "id" not in reply and on_notification is not None:
                on_notification(reply)
        if "error" in reply:
            error = reply["error"]
            raise RpcError(
                int(error.get("code", protocol.INTERNAL_ERROR)),
                str(error.get("message", "unknown error")),
            )
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    def call_tool(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        on_progress: Callable[[str], None] | None = None,
        on_event: Callable[[float, float | None, str], None] | None = None,
    ) -> dict[str, Any]:
        """Call one MCP tool and return its structured result.

        With ``on_progress``, the call carries a progress token and each progress
        notification's message (a streamed piece of text) is handed over as it comes;
        ``on_event`` gets the whole notification: progress, total (or None), message.
        """
        params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
        on_notification = None
        if on_progress is not None or on_event is not None:
            token = f"p{self._next_id + 1}"
            params["_meta"] = {"progressToken": token}

            def on_notification(note: dict[str, Any]) -> None:
                body = note.get("params") or {}
                if (
                    note.get("method") != "notifications/progress"
                    or body.get("progressToken") != token
                ):
                    return
                message = str(body.get("message") or "")
                if on_progress is not None:
                    on_progress(message)
                if on_event is not None:
                    total = body.get("total")
                    on_event(float(body.get("progress") or 0), total, message)

        result = self.request("tools/call", params, on_notification)
        if result.get("isError"):
            raise tool_error(name, result)
        structured = result.get("structuredContent")
        if isinstance(structured, dict):
            return structured
        return json.loads(result["content"][0]["text"])  # type: ignore[no-any-return]

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
        except OSError as exc:
            raise DaemonUnreachable(f"the daemon hung up ({exc})") from None

    def _receive(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise DaemonUnreachable("the daemon did not answer in time") from None
        except OSError as exc:
            raise DaemonUnreachable(f"the daemon hung up ({exc})") from None
        if not line:
            raise DaemonUnreachable("the daemon closed the connection")
        doc = json.loads(line)
        return doc if isinstance(doc, dict) else {}
