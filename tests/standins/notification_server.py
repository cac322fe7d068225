"""A private D-Bus session bus (a real ``dbus-daemon``) and a freedesktop notification
service on it that records what it is sent, for tests of desktop notifications.

The service owns ``org.freedesktop.Notifications`` and answers the methods of the
Desktop Notifications Specification a client uses: ``Notify`` (recorded, answered with
a fresh id, or the id it replaces), ``GetCapabilities`` (``body`` and, unless told
otherwise, ``body-markup``), ``GetServerInformation`` and ``CloseNotification``; any
other method gets D-Bus's UnknownMethod error. Written with jeepney (its blocking
API, in a thread), the library the daemon sends with.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jeepney import HeaderFields, MessageType, message_bus, new_error, new_method_return
from jeepney.bus_messages import DBusNameFlags
from jeepney.io.blocking import DBusConnection, open_dbus_connection

__all__ = ["NAME", "Notification", "NotificationServer", "session_bus"]

NAME = "org.freedesktop.Notifications"
_PATH = "/org/freedesktop/Notifications"


@dataclass(frozen=True)
class Notification:
    """One ``Notify`` call, as received."""

    app_name: str
    replaces_id: int
    app_icon: str
    summary: str
    body: str
    actions: list[str]
    hints: dict[str, Any]
    """Each hint as jeepney reads a variant: ``(signature, value)``."""
    expire_timeout: int
    id: int
    """The id the service answered with."""


@contextlib.contextmanager
def session_bus() -> Iterator[str]:
    """Start a private ``dbus-daemon --session``; yield its address; stop it."""
    program = shutil.which("dbus-daemon")
    if program is None:
        raise FileNotFoundError("dbus-daemon is not installed (apt install dbus-daemon)")
    proc = subprocess.Popen(
        [program, "--session", "--nofork", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"dbus-daemon printed no address (exit {proc.poll()})")
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class NotificationServer:
    """The notification service on ``address``, answering in a thread of its own."""

    def __init__(self, address: str, capabilities: Sequence[str] = ("body", "body-markup")) -> None:
        self.address = address
        self.capabilities = list(capabilities)
        self.calls: list[Notification] = []
        self.methods: list[str] = []
        """Every method called on the service, in order."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next_id = 0
        self._conn: DBusConnection = open_dbus_connection(address)
        reply = self._conn.send_and_get_reply(
            message_bus.RequestName(NAME, DBusNameFlags.do_not_queue), timeout=10
        )
        if reply.body != (1,):  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
            raise RuntimeError(f"could not own {NAME}: {reply.body}")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._conn.close()

    def __enter__(self) -> NotificationServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def received(self) -> list[Notification]:
        with self._lock:
            return list(self.calls)

    def wait_for(self, count: int, timeout: float = 60) -> list[Notification]:
        """The first ``count`` notifications, once that many came (AssertionError if not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.received()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{count} notification(s) expected, got {self.received()}")

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._conn.receive(timeout=0.1)
            except TimeoutError:
                continue
            except (OSError, EOFError):
                return
            if msg.header.message_type is MessageType.method_call:
                self._conn.send(self._answer(msg))

    def _answer(self, msg: Any) -> Any:
        fields = msg.header.fields
        member = fields.get(HeaderFields.member)
        with self._lock:
            self.methods.append(str(member))
        if fields.get(HeaderFields.path) != _PATH:
            return new_error(msg, "org.freedesktop.DBus.Error.UnknownObject")
        if member == "GetCapabilities":
            return new_method_return(msg, "as", (self.capabilities,))
        if member == "GetServerInformation":
            return new_method_return(msg, "ssss", ("standin", "tale-tests", "1", "1.2"))
        if member == "CloseNotification":
            return new_method_return(msg)
        if member == "Notify":
            app, replaces, icon, summary, body, actions, hints, expire = msg.body
            with self._lock:
                if replaces:
                    shown = replaces
                else:
                    self._next_id += 1
                    shown = self._next_id
                call = (app, replaces, icon, summary, body, list(actions), dict(hints), expire)
                self.calls.append(Notification(*call, shown))
            return new_method_return(msg, "u", (shown,))
        return new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod")
