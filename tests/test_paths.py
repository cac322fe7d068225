"""The client's copy of the path rules agrees with the daemon's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tale_client.paths as client_paths
import taled.paths as daemon_paths

FUNCTIONS = ["config_file", "data_dir", "lock_file", "log_file", "runtime_dir", "socket_path"]
# The daemon's alone: it repairs files on disk, which the client never does.
DAEMON_ONLY = ["secure_data_dir"]
VARS = ["XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "TALE_SOCKET", "HOME"]

values = st.one_of(
    st.none(),
    st.just(""),
    st.just("relative/dir"),
    st.text(alphabet="abc/_-.", min_size=1, max_size=12).map(lambda s: "/tmp/" + s),
)


def test_both_copies_export_the_same_functions() -> None:
    """tale_client/paths.py has every path rule taled/paths.py has, and the same error."""
    assert sorted(client_paths.__all__) == ["PathError", *FUNCTIONS]
    assert sorted(daemon_paths.__all__) == sorted(["PathError", *FUNCTIONS, *DAEMON_ONLY])


def _outcome(fn: Any) -> object:
    """What a path rule gives: its path, or its error's message."""
    try:
        return fn()
    except ValueError as exc:
        return f"{type(exc).__name__}: {exc}"


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
            client, daemon = getattr(client_paths, name), getattr(daemon_paths, name)
            assert _outcome(client) == _outcome(daemon), name
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


@pytest.mark.parametrize("module", [daemon_paths, client_paths], ids=["daemon", "client"])
def test_a_relative_tale_socket_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, module: Any
) -> None:
    """TALE_SOCKET=taled.sock would name a different socket in every directory: refused."""
    monkeypatch.setenv("TALE_SOCKET", "taled.sock")
    with pytest.raises(module.PathError, match=r"TALE_SOCKET='taled\.sock' must be an absolute"):
        module.socket_path()


@pytest.mark.parametrize("module", [daemon_paths, client_paths], ids=["daemon", "client"])
def test_without_xdg_runtime_dir_the_socket_is_the_login_shells(
    monkeypatch: pytest.MonkeyPatch, login_runtime_dir: Path, module: Any
) -> None:
    """An editor's environment without XDG_RUNTIME_DIR names the socket a login shell does."""
    monkeypatch.delenv("TALE_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(login_runtime_dir))
    shell = module.socket_path()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert module.socket_path() == shell == login_runtime_dir / "tale" / "taled.sock"


@pytest.mark.parametrize(
    "env",
    [
        {"HOME": "/home/u"},
        {"HOME": "/home/u", "XDG_DATA_HOME": "/srv/data/", "XDG_CONFIG_HOME": "/etc/u"},
        {"HOME": "/home/u", "XDG_DATA_HOME": "relative", "XDG_CONFIG_HOME": ""},
        {"HOME": "relative/home"},
    ],
    ids=["defaults", "xdg-set", "xdg-relative-or-empty", "home-relative"],
)
def test_data_and_config_dirs_are_platformdirs_for_the_same_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """The daemon's data and config directories are what platformdirs gives for "tale"."""
    import platformdirs

    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert daemon_paths.data_dir() == platformdirs.user_data_path("tale", appauthor=False)
    assert daemon_paths.config_file().parent == platformdirs.user_config_path(
        "tale", appauthor=False
    )


def test_a_relative_home_is_ignored_for_the_password_databases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HOME=relative/dir would move the data directory with the working directory: ignored."""
    import pwd

    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", "relative/dir")
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert daemon_paths.data_dir() == home / ".local" / "share" / "tale"
