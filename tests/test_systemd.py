"""The systemd user unit: the checked-in file, ``tale daemon install``, systemd's verdict.

``systemd/taled.service`` is ``UNIT_TEMPLATE`` (tale_client/daemon.py) rendered with
``ExecStart=%h/.local/bin/taled`` (where ``pipx install`` puts taled); ``tale daemon
install`` renders the same template with this environment's interpreter. The tests
pin the two together and let ``systemd-analyze verify`` judge both.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tale_client.daemon import CHECKED_IN_EXEC_START, exec_start_line, render_unit
from tests.harness import Home

REPO = Path(__file__).resolve().parent.parent
CHECKED_IN_UNIT = REPO / "systemd" / "taled.service"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd); "
    ".ci/run installs it",
)


def _installed_unit(home: Home) -> Path:
    result = home.tale("daemon", "install")
    assert result.returncode == 0, result.stderr
    return home.root / "c" / "systemd" / "user" / "taled.service"


def _exec_start(unit_text: str) -> str:
    lines = [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, unit_text
    return lines[0].removeprefix("ExecStart=")


def _verify(unit: Path, runtime_dir: Path, home_dir: Path | None = None) -> str:
    """Run ``systemd-analyze --user verify`` on a unit; the problems it reports about it."""
    assert SYSTEMD_ANALYZE is not None
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    if home_dir is not None:
        env["HOME"] = str(home_dir)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "--user", "verify", str(unit)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Warnings (an unknown key, a missing executable) leave the exit code at 0 but
    # name the unit; unrelated noise about the host's own units is ignored.
    problems = [line for line in result.stderr.splitlines() if unit.name in line]
    if result.returncode != 0:
        problems.append(f"exit {result.returncode}: {result.stderr.strip()}")
    return "\n".join(problems)


def test_checked_in_unit_is_the_template_rendered_for_local_bin() -> None:
    """systemd/taled.service is exactly UNIT_TEMPLATE with ExecStart=%h/.local/bin/taled."""
    expected = render_unit(CHECKED_IN_EXEC_START)
    assert CHECKED_IN_UNIT.read_text() == expected, (
        "systemd/taled.service drifted from UNIT_TEMPLATE in tale_client/daemon.py; "
        "edit the template, then regenerate the file with: python -c 'from "
        "tale_client.daemon import render_unit, CHECKED_IN_EXEC_START; "
        'open("systemd/taled.service", "w").write(render_unit(CHECKED_IN_EXEC_START))\''
    )


def test_install_writes_the_unit_under_xdg_config_home(home: Home) -> None:
    """`tale daemon install` writes $XDG_CONFIG_HOME/systemd/user/taled.service and says so."""
    result = home.tale("daemon", "install")
    unit = home.root / "c" / "systemd" / "user" / "taled.service"
    assert result.returncode == 0, result.stderr
    assert unit.is_file()
    assert str(unit) in result.stdout


def test_installed_unit_differs_from_the_checked_in_one_only_in_exec_start(home: Home) -> None:
    """The installed unit is the checked-in unit with its ExecStart line replaced."""
    installed = _installed_unit(home).read_text()
    checked_in = CHECKED_IN_UNIT.read_text()
    replaced = checked_in.replace(
        f"ExecStart={_exec_start(checked_in)}\n", f"ExecStart={_exec_start(installed)}\n"
    )
    assert installed == replaced


def test_installed_exec_start_runs_this_interpreters_taled(home: Home) -> None:
    """The installed ExecStart is `<this interpreter> -m taled`, and running it runs taled."""
    argv = shlex.split(_exec_start(_installed_unit(home).read_text()))
    assert argv == [sys.executable, "-m", "taled"]
    result = subprocess.run(
        [*argv, "--version"], capture_output=True, text=True, timeout=60, env=home.env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("taled ")


@needs_systemd_analyze
def test_systemd_analyze_accepts_the_installed_unit(home: Home) -> None:
    """`systemd-analyze --user verify` reports nothing wrong with the installed unit."""
    unit = _installed_unit(home)
    assert _verify(unit, home.root / "r") == ""


@needs_systemd_analyze
def test_systemd_analyze_accepts_the_checked_in_unit(tmp_path: Path) -> None:
    """`systemd-analyze --user verify` accepts systemd/taled.service given ~/.local/bin/taled."""
    user_home = tmp_path / "home"
    (user_home / ".local" / "bin").mkdir(parents=True)
    (user_home / ".local" / "bin" / "taled").symlink_to(Path(sys.executable).parent / "taled")
    assert _verify(CHECKED_IN_UNIT, tmp_path / "run", home_dir=user_home) == ""


@needs_systemd_analyze
def test_systemd_analyze_finds_an_interpreter_under_a_path_with_space_percent_dollar(
    tmp_path: Path,
) -> None:
    """An interpreter path with a space, '%' and '$' survives systemd's ExecStart parsing."""
    odd_dir = tmp_path / "My venv %h $HOME"
    odd_dir.mkdir()
    (odd_dir / "python").symlink_to(sys.executable)
    unit = tmp_path / "taled.service"
    unit.write_text(render_unit(exec_start_line([str(odd_dir / "python"), "-m", "taled"])))
    assert _verify(unit, tmp_path / "run") == ""


@needs_systemd_analyze
def test_systemd_analyze_reports_a_missing_executable(tmp_path: Path) -> None:
    """The verify helper does catch a unit whose ExecStart points nowhere (no false pass)."""
    unit = tmp_path / "taled.service"
    unit.write_text(render_unit(exec_start_line([str(tmp_path / "no-such-python"), "-m"])))
    assert "no-such-python" in _verify(unit, tmp_path / "run")
