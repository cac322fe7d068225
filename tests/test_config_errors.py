"""A configuration mistake is an error that names what is wrong and where it came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from taled.errors import ConfigError
from taled.settings import load_settings
from tests.harness import Home


def test_an_unknown_tale_variable_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """TALE_FOO=1 sets nothing, so it is refused with its name rather than ignored."""
    monkeypatch.setenv("TALE_FOO", "1")
    with pytest.raises(ConfigError, match="TALE_FOO names no setting"):
        load_settings(None)


def test_a_variable_for_a_misspelt_table_is_an_error_suggesting_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TALE_QUEU__WORKERS=4 is refused, naming the variable and the likely intended one."""
    monkeypatch.setenv("TALE_QUEU__WORKERS", "4")
    with pytest.raises(ConfigError, match=r"TALE_QUEU__WORKERS.*did you mean TALE_QUEUE__WORKERS"):
        load_settings(None)


def test_the_socket_and_start_timeout_variables_are_not_settings_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TALE_SOCKET and TALE_START_TIMEOUT are read elsewhere, so the settings accept them."""
    monkeypatch.setenv("TALE_SOCKET", "/tmp/x.sock")
    monkeypatch.setenv("TALE_START_TIMEOUT", "5")
    assert load_settings(None).queue.workers == 2


def test_an_api_key_variable_named_in_the_settings_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A TALE_ variable that models.openai.api_key_env names holds a key, not a setting."""
    monkeypatch.setenv("TALE_MODELS__OPENAI__API_KEY_ENV", "TALE_OPENAI_KEY")
    monkeypatch.setenv("TALE_OPENAI_KEY", "sesame")
    assert load_settings(None).models.openai.api_key_env == "TALE_OPENAI_KEY"


def test_a_table_variable_that_is_not_json_is_blamed_on_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TALE_QUEUE=not json is reported against TALE_QUEUE, not against the config file."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[queue]\nworkers = 3\n")
    monkeypatch.setenv("TALE_QUEUE", "not json")
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    assert "TALE_QUEUE: its value must be a JSON object" in caught.value.message
    assert str(cfg) not in caught.value.message


def test_a_bad_value_from_a_variable_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-range value set by TALE_QUEUE__WORKERS says it came from that variable."""
    monkeypatch.setenv("TALE_QUEUE__WORKERS", "0")
    with pytest.raises(ConfigError, match=r"queue\.workers: .* \(from TALE_QUEUE__WORKERS\)"):
        load_settings(None)


def test_a_bad_value_from_the_file_names_the_file(tmp_path: Path) -> None:
    """An out-of-range value in taled.toml says it came from that file."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[queue]\nworkers = 0\n")
    with pytest.raises(ConfigError, match=rf"queue\.workers: .* \(from {cfg}\)"):
        load_settings(cfg)


def test_a_config_path_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    """A taled.toml that is a directory is refused, not skipped as if it were absent."""
    cfg = tmp_path / "taled.toml"
    cfg.mkdir()
    with pytest.raises(ConfigError, match=rf"{cfg} is not a file"):
        load_settings(cfg)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_number_in_the_file_is_an_error_saying_so(tmp_path: Path, value: str) -> None:
    """inf and nan are valid TOML, but no setting takes them: the error says why."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text(f"[runner]\ncall_timeout_seconds = {value}\n")
    with pytest.raises(ConfigError, match=r"runner\.call_timeout_seconds: must be a finite number"):
        load_settings(cfg)


def test_nan_from_a_variable_is_not_reported_as_out_of_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TALE_RUNNER__STOP_WAIT_SECONDS=nan says "finite number", not "should be ≤ 600"."""
    monkeypatch.setenv("TALE_RUNNER__STOP_WAIT_SECONDS", "nan")
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    assert "must be a finite number" in caught.value.message
    assert "less than" not in caught.value.message


def test_a_variable_below_a_plain_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """TALE_DAEMON__LOG_LEVEL__X treats a value as a table: refused, naming the variable."""
    monkeypatch.setenv("TALE_DAEMON__LOG_LEVEL__X", "1")
    with pytest.raises(ConfigError, match=r"TALE_DAEMON__LOG_LEVEL__X: daemon\.log_level is one"):
        load_settings(None)


def test_taled_refuses_a_relative_tale_socket_with_exit_2(home: Home) -> None:
    """taled with TALE_SOCKET=taled.sock exits 2 naming the variable, creating nothing."""
    home.env["TALE_SOCKET"] = "taled.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "taled"],
        env=home.env,
        cwd=home.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "TALE_SOCKET='taled.sock' must be an absolute path" in proc.stderr
    assert not (home.root / "taled.sock").exists()


def test_tale_refuses_a_relative_tale_socket_as_a_usage_error(home: Home) -> None:
    """`tale list` with a relative TALE_SOCKET exits 2 naming it, and starts no daemon."""
    home.env["TALE_SOCKET"] = "taled.sock"
    proc = home.tale("list")
    assert proc.returncode == 2
    assert "TALE_SOCKET='taled.sock' must be an absolute path" in proc.stderr
    assert not home.data.exists()


def test_taled_exits_2_naming_an_unknown_variable(home: Home) -> None:
    """taled with TALE_QUEU__WORKERS=4 exits 2 and says which variable is wrong."""
    home.env["TALE_QUEU__WORKERS"] = "4"
    proc = subprocess.run(
        [sys.executable, "-m", "taled"], env=home.env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "TALE_QUEU__WORKERS" in proc.stderr
    assert not home.socket.exists()


@pytest.mark.parametrize("value", ["soon", "inf", "0"])
def test_a_bad_start_timeout_is_an_error_naming_it(home: Home, value: str) -> None:
    """TALE_START_TIMEOUT that is no positive number of seconds is named, not a traceback."""
    home.env["TALE_START_TIMEOUT"] = value
    proc = home.tale("list")
    assert proc.returncode == 3
    assert f"TALE_START_TIMEOUT={value!r} must be a positive number of seconds" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not home.socket.exists()


def test_taled_with_a_missing_config_file_exits_2_naming_it(home: Home) -> None:
    """taled --config PATH with no file at PATH exits 2 naming the path, not run on defaults."""
    missing = home.root / "nowhere" / "taled.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "taled", "--config", str(missing)],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"--config {missing}: no such file" in proc.stderr
    assert not home.socket.exists()
