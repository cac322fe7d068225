"""`taled --print-config` and `tale daemon config`: the effective settings, each with its source."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from typing import Any

from taled.settings import is_secret
from tests.harness import Home


def _print_config(home: Home, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the real `taled --print-config` in ``home``; its stdout (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-m", "taled", "--print-config", *args],
        env={**home.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _line(text: str, table: str, key: str) -> str:
    """The line of ``key`` in ``[table]`` of the printed configuration."""
    section = text.split(f"\n[{table}]\n", 1)[1].split("\n[", 1)[0]
    [line] = [line for line in section.splitlines() if line.startswith(f"{key} = ")]
    return line


def _without_comments(text: str) -> str:
    """The text with every comment removed: whole comment lines, and `  # ...` after values."""
    kept = (re.sub(r"  # [^\"]*$", "", line) for line in text.splitlines())
    return "\n".join(line for line in kept if not line.startswith("#"))


def test_a_value_from_the_config_file_names_the_file(home: Home) -> None:
    """A setting in the user's taled.toml is printed with the file's path as its source."""
    home.write_config("[queue]\nworkers = 3\n")
    text = _print_config(home)
    assert _line(text, "queue", "workers") == f"workers = 3  # file {home.config_file}"


def test_a_value_from_the_environment_names_the_variable(home: Home) -> None:
    """A setting from TALE_QUEUE__WORKERS is printed with that variable as its source,
    even when the file sets it too (the variable wins)."""
    home.write_config("[queue]\nworkers = 3\n")
    text = _print_config(home, env={"TALE_QUEUE__WORKERS": "5"})
    assert _line(text, "queue", "workers") == "workers = 5  # env TALE_QUEUE__WORKERS"


def test_a_value_nobody_set_is_marked_default(home: Home) -> None:
    """A setting neither the file nor the environment sets is printed as the default."""
    home.write_config("[queue]\nworkers = 3\n")
    text = _print_config(home)
    assert _line(text, "queue", "default_priority") == "default_priority = 50  # default"


def test_a_dict_entry_set_by_a_variable_names_the_variable(home: Home) -> None:
    """One entry of a table setting (tools.policy.run) set by its variable shows that
    variable, while the entries it did not set stay defaults."""
    text = _print_config(home, env={"TALE_TOOLS__POLICY__RUN": "allow"})
    assert _line(text, "tools.policy", "run") == 'run = "allow"  # env TALE_TOOLS__POLICY__RUN'
    assert _line(text, "tools.policy", "read_file") == 'read_file = "allow"  # default'


def test_the_output_without_comments_loads_as_the_effective_settings(home: Home) -> None:
    """With its comments stripped the output is TOML holding exactly the settings the daemon
    would load (from defaults, the file and the environment)."""
    home.write_config('[queue]\nworkers = 3\n\n[models.llamacpp.models]\n"my model" = "/m.gguf"\n')
    text = _print_config(home, env={"TALE_CHAT__TEMPERATURE": "0.5"})
    printed = tomllib.loads(_without_comments(text))
    expected = _effective(home, {"TALE_CHAT__TEMPERATURE": "0.5"})
    assert printed == expected


def _effective(home: Home, env: dict[str, str]) -> dict[str, Any]:
    """The settings as the daemon loads them in ``home`` (in a process with its environment)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from pathlib import Path; from taled.settings import "
            "load_settings; print(json.dumps(load_settings(Path(sys.argv[1]))"
            ".model_dump(mode='json')))",
            str(home.config_file),
        ],
        env={**home.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_the_output_loads_as_toml_with_its_comments(home: Home) -> None:
    """The comments are TOML comments: the output loads as it is, with tomllib."""
    home.write_config("[queue]\nworkers = 3\n")
    assert tomllib.loads(_print_config(home))["queue"]["workers"] == 3


def test_secrets_print_as_stars(home: Home) -> None:
    """A token in an MCP server's env and a password in a URL print as "***"; the secrets
    appear nowhere in the output."""
    home.write_config(
        "[tools.mcp.gh]\n"
        'command = "gh-mcp"\n'
        'env = { GITHUB_TOKEN = "sesame-token", EDITOR = "vi" }\n\n'
        "[models.ollama]\n"
        'host = "http://me:sesame-pw@gpu-box:11434"\n'
    )
    text = _print_config(home)
    assert "sesame" not in text
    assert _line(text, "tools.mcp.gh.env", "GITHUB_TOKEN").startswith('GITHUB_TOKEN = "***"  #')
    assert _line(text, "tools.mcp.gh.env", "EDITOR").startswith('EDITOR = "vi"  #')
    assert _line(text, "models.ollama", "host").startswith('host = "http://me:***@gpu-box:11434"')


def test_names_that_end_in_key_or_token_are_secret_and_counts_are_not() -> None:
    """api_key and GITHUB_TOKEN hold secrets; max_tokens, chars_per_token (numbers) and
    api_key_env (a variable's name) do not."""
    assert is_secret("api_key", "x")
    assert is_secret("GITHUB_TOKEN", "x")
    assert not is_secret("max_tokens", 48)
    assert not is_secret("chars_per_token", 4.0)
    assert not is_secret("api_key_env", "OPENAI_API_KEY")


def test_print_config_starts_nothing_and_writes_nothing(home: Home) -> None:
    """`taled --print-config` exits 0 without a socket, a database or a log appearing."""
    _print_config(home)
    assert not home.socket.exists()
    assert not home.data.exists()


def test_print_config_names_the_file_it_read(home: Home) -> None:
    """The header names the config file used, or says there is none."""
    assert "does not exist" in _print_config(home).splitlines()[2]
    home.write_config("[queue]\nworkers = 3\n")
    assert _print_config(home).splitlines()[2] == f"# Config file: {home.config_file}."


def test_print_config_with_a_missing_config_file_exits_2_naming_it(home: Home) -> None:
    """`taled --config missing.toml --print-config` exits 2 naming the file, printing nothing."""
    missing = home.root / "missing.toml"
    done = subprocess.run(
        [sys.executable, "-m", "taled", "--config", str(missing), "--print-config"],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert str(missing) in done.stderr
    assert done.stdout == ""


def test_print_config_of_an_invalid_setting_exits_2_naming_it(home: Home) -> None:
    """An invalid configuration is reported as the daemon reports it (exit 2), not printed."""
    home.write_config("[queue]\nworkerz = 2\n")
    done = subprocess.run(
        [sys.executable, "-m", "taled", "--print-config"],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "queue.workerz" in done.stderr


def test_tale_daemon_config_prints_what_taled_prints(home: Home) -> None:
    """`tale daemon config` runs `taled --print-config` and prints its output unchanged."""
    home.write_config("[queue]\nworkers = 3\n")
    proc = home.tale("daemon", "config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _print_config(home)


def test_tale_daemon_config_with_a_missing_file_exits_2_naming_it(home: Home) -> None:
    """`tale daemon config --config missing.toml` exits 2 with taled's message."""
    missing = home.root / "missing.toml"
    proc = home.tale("daemon", "config", "--config", str(missing))
    assert proc.returncode == 2
    assert f"{missing}: no such file" in proc.stderr
