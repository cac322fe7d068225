"""The client's copy of the path rules agrees with the daemon's."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tale_client.paths as client_paths
import taled.paths as daemon_paths

FUNCTIONS = ["config_file", "data_dir", "lock_file", "log_file", "runtime_dir", "socket_path"]
VARS = ["XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "TALE_SOCKET", "HOME"]

values = st.one_of(
    st.none(),
    st.just(""),
    st.just("relative/dir"),
    st.text(alphabet="abc/_-.", min_size=1, max_size=12).map(lambda s: "/tmp/" + s),
)


def test_both_copies_export_the_same_functions() -> None:
    """tale_client/paths.py has every function taled/paths.py has."""
    assert sorted(client_paths.__all__) == sorted(daemon_paths.__all__) == FUNCTIONS


@settings(max_examples=200)
@given(env=st.fixed_dictionaries({v: values for v in VARS}))
def test_client_and_daemon_resolve_paths_identically(env: dict[str, str | None]) -> None:
    """For any XDG/TALE_SOCKET environment, both copies give the same paths."""
    saved = {v: os.environ.get(v) for v in VARS}
    try:
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if not os.environ.get("HOME"):
            os.environ["HOME"] = "/root"
        for name in FUNCTIONS:
            assert getattr(client_paths, name)() == getattr(daemon_paths, name)(), name
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def test_tale_socket_overrides_the_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """TALE_SOCKET names the socket directly."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1")
    monkeypatch.setenv("TALE_SOCKET", "/tmp/x.sock")
    assert str(daemon_paths.socket_path()) == "/tmp/x.sock"


def test_relative_xdg_dirs_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative XDG_DATA_HOME is invalid per the XDG spec and falls back to ~/.local/share."""
    monkeypatch.setenv("XDG_DATA_HOME", "relative")
    monkeypatch.setenv("HOME", "/home/u")
    assert str(daemon_paths.data_dir()) == "/home/u/.local/share/tale"
