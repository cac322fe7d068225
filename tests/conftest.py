"""Fixtures: a fresh XDG home and a real daemon running in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Daemon, Home


@pytest.fixture
def home() -> Iterator[Home]:
    """An isolated, empty XDG home (no daemon running)."""
    h = Home()
    yield h
    h.cleanup()


@pytest.fixture
def daemon(home: Home) -> Iterator[Daemon]:
    """A real taled, with the embedded model loaded, listening in ``home``."""
    d = Daemon(home).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(10)


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One real taled for a module's read-mostly tests (saves start-ups)."""
    h = Home()
    d = Daemon(h).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(10)
    h.cleanup()
