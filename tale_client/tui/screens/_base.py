"""What every screen that talks to the daemon shares: the API, and calls that cannot crash it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from textual.screen import Screen

from tale_client.sanitize import printable
from tale_client.tui.api import Api
from tale_client.tui.client import DaemonUnreachable, RpcError

if TYPE_CHECKING:
    from tale_client.tui.app import TaleApp

__all__ = ["TaleScreen", "call_api"]

T = TypeVar("T")


async def call_api(
    screen: Screen[Any],
    call: Callable[[Api], Awaitable[T]],
    what: str,
    on_error: Callable[[str], None] | None = None,
) -> T | None:
    """Run one call; None when not connected or when it failed (the error is shown).

    The error goes to ``on_error`` when given (a view that says it in place), else
    to a notification. A lost connection is not reported here: the app notices it
    and shows the daemon-is-down screen.
    """
    api = cast("TaleApp", screen.app).api
    if api is None:
        return None
    try:
        return await call(api)
    except DaemonUnreachable:
        return None
    except RpcError as exc:
        message = f"{what}: {printable(exc.message)}"
        if on_error is not None:
            on_error(message)
        else:
            screen.notify(message, severity="error", timeout=6)
    except TimeoutError:
        message = f"{what}: the daemon did not answer in time"
        if on_error is not None:
            on_error(message)
        else:
            screen.notify(message, severity="warning")
    return None


class TaleScreen(Screen[None]):
    """A screen of the tale app."""

    @property
    def tale(self) -> TaleApp:
        """The app, typed."""
        return cast("TaleApp", self.app)

    @property
    def closing(self) -> bool:
        """Whether the screen is being taken down (popped, or the app is quitting)."""
        # `display` turns False as soon as Textual starts pruning a node.
        return not self.is_attached or not self.display

    async def call(
        self,
        call: Callable[[Api], Awaitable[T]],
        what: str,
        on_error: Callable[[str], None] | None = None,
    ) -> T | None:
        """``call_api`` on this screen; None too if the screen closed while it waited."""
        result = await call_api(self, call, what, on_error)
        return None if self.closing else result
