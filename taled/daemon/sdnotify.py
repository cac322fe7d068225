"""systemd's notify protocol, spoken on ``$NOTIFY_SOCKET`` directly (no libsystemd).

``READY=1`` once the models are loaded and the socket listens, ``STOPPING=1`` on
shutdown, and ``WATCHDOG=1`` every ``WATCHDOG_USEC * fraction`` when systemd
asks for a watchdog. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

import anyio

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with '@' is in Linux's abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_seconds: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        """Whether a service manager is listening."""
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if nobody listens or it failed."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop, even if the manager's queue is full.
                sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    async def watchdog(self, fraction: float) -> None:
        """Ping the watchdog until cancelled (returns at once when none is configured)."""
        if self.watchdog_seconds is None or not self.enabled:
            return
        interval = self.watchdog_seconds * fraction
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(interval)
