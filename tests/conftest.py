"""Fixtures: a fresh XDG home and a real daemon running in it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import LOCAL_ZONE, Daemon, Home, in_zone, running_daemon


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


@pytest.fixture
def login_runtime_dir() -> Iterator[Path]:
    """``/run/user/$UID`` as systemd-logind makes it at login; created here if absent.

    The real directory, not a stand-in: the path rules look for it there. What this
    fixture creates it removes; a ``tale`` directory already in it (a real daemon of
    this user) skips the test rather than disturb it.
    """
    root = Path("/run/user")
    path = root / str(os.getuid())
    if (path / "tale").exists():
        pytest.skip(f"{path / 'tale'} exists: a daemon of this user may be using it")
    made_root = not root.exists()
    made = not path.exists()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path / "tale", ignore_errors=True)
        if made:
            path.rmdir()
        if made_root:
            root.rmdir()


@pytest.fixture
def local_zone() -> Iterator[None]:
    """Local time is India's (UTC+05:30, abbreviated IST) for the test."""
    with in_zone(LOCAL_ZONE):
        yield
