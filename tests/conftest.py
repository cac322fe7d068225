"""Fixtures: a fresh XDG home and a real daemon running in it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Daemon, Home, running_daemon


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
    d.kill_if_running()


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    """One real taled for a module's read-mostly tests (saves start-ups)."""
    with running_daemon() as d:
        yield d
