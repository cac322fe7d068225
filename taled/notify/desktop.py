"""Desktop notifications: ``org.freedesktop.Notifications.Notify`` on the session bus.

The bus is the one ``DBUS_SESSION_BUS_ADDRESS`` names, else ``$XDG_RUNTIME_DIR/bus``
when that socket exists (where systemd's user session puts it); with neither, desktop
notifications are off and the log says so once. D-Bus is spoken by ``jeepney`` (pure
Python, asyncio), over a connection opened for each notification, so a bus or a
notification service that restarted in between costs nothing.

Sending never makes anyone wait: notices go into a bounded queue that one background
task sends, each within ``notifications.timeout_seconds``; a failure is logged
(rate-limited) and the notice dropped. The words are plain text: where the service
says it reads markup in bodies (``body-markup``), ``&``, ``<`` and ``>`` are escaped so
a task's text shows as written. A task's later notice replaces its earlier one on
screen (the id ``Notify`` returned), so "waits for you" becomes "completed".
"""

from __future__ import annotations

import asyncio
import collections
import html
import logging
import os
import stat
from collections.abc import Mapping
from typing import Any

from jeepney import DBusAddress, DBusErrorResponse, new_method_call
from jeepney.io.asyncio import DBusRouter, open_dbus_router
from jeepney.wrappers import unwrap_msg

from taled.notify.notice import Notice, NoticeKind
from taled.notify.throttle import Throttle
from taled.settings import NotificationSettings

__all__ = ["Desktop", "session_bus_address"]

log = logging.getLogger(__name__)

SERVICE = DBusAddress(
    "/org/freedesktop/Notifications",
    bus_name="org.freedesktop.Notifications",
    interface="org.freedesktop.Notifications",
)
APP_NAME = "tale"

# Urgency hint levels of the specification: 0 low, 1 normal, 2 critical.
_URGENCY = {
    NoticeKind.COMPLETED: 1,
    NoticeKind.FAILED: 2,
    NoticeKind.CANCELLED: 0,
    NoticeKind.WAITING: 2,
}
# Notices waiting to be sent; past it the newest is dropped.
_QUEUE = 64
# Tasks whose on-screen notification a later one replaces (the most recent ones).
_REMEMBERED = 256


def session_bus_address(environ: Mapping[str, str]) -> str | None:
    """The session bus's address: DBUS_SESSION_BUS_ADDRESS, else the socket
    ``$XDG_RUNTIME_DIR/bus`` if there is one; None when there is no bus."""
    address = environ.get("DBUS_SESSION_BUS_ADDRESS", "").strip()
    if address:
        return address
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime:
        path = os.path.join(runtime, "bus")
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return f"unix:path={path}"
        except OSError:
            pass
    return None


class Desktop:
    """Sends notices to the desktop's notification service, one at a time."""

    def __init__(self, settings: NotificationSettings, address: str) -> None:
        self._settings = settings
        self._address = address
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(_QUEUE)
        self._shown: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._failures = Throttle(log)
        self._drops = Throttle(log)

    @property
    def address(self) -> str:
        return self._address

    def offer(self, notice: Notice) -> None:
        """Queue ``notice`` to be sent; never waits (a full queue drops it, saying so)."""
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            self._drops.warning(
                "desktop notification for task %s dropped: %d are waiting to be sent",
                notice.task.id,
                self._queue.qsize(),
            )

    async def run(self) -> None:
        """Send what is offered, for ever (cancel to stop)."""
        while True:
            notice = await self._queue.get()
            await self.send(notice)

    async def send(self, notice: Notice) -> bool:
        """Send one notice within the timeout; False (and a log line) if it was not."""
        timeout = self._settings.timeout_seconds
        try:
            shown = await asyncio.wait_for(self._notify(notice), timeout)
        except TimeoutError:
            self._failures.warning(
                "desktop notification for task %s not sent: the session bus %s did not "
                "answer within %s s (notifications.timeout_seconds)",
                notice.task.id,
                self._address,
                timeout,
            )
            return False
        except Exception as exc:  # noqa: BLE001 - any failure of the bus is logged, never raised
            self._failures.warning(
                "desktop notification for task %s not sent over %s: %s",
                notice.task.id,
                self._address,
                _describe(exc),
            )
            return False
        if self._failures.failing:
            log.info("desktop notifications are sent again over %s", self._address)
            self._failures.clear()
        self._remember(notice.task.id, shown)
        return True

    async def _notify(self, notice: Notice) -> int:
        async with open_dbus_router(self._address) as router:
            markup = "body-markup" in await self._capabilities(router)
            body = notice.body(self._settings.body_chars)
            if markup:
                body = html.escape(body, quote=False)
            expire = self._settings.expire_seconds * 1000 or -1
            hints: dict[str, tuple[str, Any]] = {"urgency": ("y", _URGENCY[notice.kind])}
            message = new_method_call(
                SERVICE,
                "Notify",
                "susssasa{sv}i",
                (
                    APP_NAME,
                    self._shown.get(notice.task.id, 0),
                    "",
                    notice.summary(),
                    body,
                    [],
                    hints,
                    expire,
                ),
            )
            answer = unwrap_msg(await router.send_and_get_reply(message))
            return int(answer[0]) if answer else 0

    @staticmethod
    async def _capabilities(router: DBusRouter) -> list[str]:
        """The service's capabilities; none when it does not say (then bodies are plain)."""
        reply = await router.send_and_get_reply(new_method_call(SERVICE, "GetCapabilities"))
        try:
            answer = unwrap_msg(reply)
        except DBusErrorResponse:
            return []
        return [str(c) for c in answer[0]] if answer else []

    def _remember(self, task_id: str, shown: int) -> None:
        if not shown:
            return
        self._shown[task_id] = shown
        self._shown.move_to_end(task_id)
        while len(self._shown) > _REMEMBERED:
            self._shown.popitem(last=False)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
