"""The systemd user unit: the checked-in file, ``tale daemon install``, systemd's verdict.

``systemd/taled.service`` is ``UNIT_TEMPLATE`` (tale_client/daemon.py) rendered with
``ExecStart=%h/.local/bin/taled`` (where ``pipx install`` puts taled); ``tale daemon
install`` renders the same template with this environment's interpreter. The tests
pin the two together and let ``systemd-analyze verify`` judge both.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

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


# -- hardening (issue 17): the unit's directives, systemd's score, the sandbox under them --

# What the unit must set, and what it must not: each left-out one breaks acting on the
# user's directories, the sandbox's /proc, the GPU or ctypes (docs/systemd.md).
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "PrivateMounts": "yes",
    "ProtectSystem": "full",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "ProtectHostname": "yes",
    "ProtectClock": "yes",
    "PrivateIPC": "yes",
    "KeyringMode": "private",
    "RestrictSUIDSGID": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "RestrictNamespaces": "user mnt pid ipc uts net",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
}
LEFT_OUT = (
    "ProtectHome",
    "PrivateTmp",
    "ProtectKernelTunables",
    "ProtectKernelLogs",
    "ProtectProc",
    "PrivateDevices",
    "PrivateUsers",
    "MemoryDenyWriteExecute",
    "PrivateNetwork",
)
# The overall exposure `systemd-analyze security --offline=yes --user` gives the unit
# (5.1 when this was written, 9.7 before the hardening); a looser unit fails.
MAX_EXPOSURE = 5.5

# The mounts systemd makes for the unit in its own user namespace (ProtectSystem=full,
# ProtectKernelModules, ProtectControlGroups), then exec the daemon without capabilities.
# argv[1] "tunables" adds ProtectKernelTunables' read-only /proc/sys.
SYSTEMD_MOUNTS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
def mount(src, dst, fstype, flags, data=None):
    args = (src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode())
    if libc.mount(*args) != 0:
        raise OSError(ctypes.get_errno(), f"mount {dst}")
def read_only(path):
    if os.path.exists(path):
        mount(path, path, None, MS_BIND | MS_REC)
        mount("none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
for path in ("/usr", "/etc", "/boot", "/efi", "/sys/fs/cgroup"):
    read_only(path)
if os.path.isdir("/usr/lib/modules"):
    mount("tmpfs", "/usr/lib/modules", "tmpfs", 0, "mode=000")
if sys.argv[1] == "tunables":
    read_only("/proc/sys")
libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL: the daemon runs with none
os.execv(sys.argv[2], sys.argv[2:])
"""

# The daemon's side: one sandboxed run that reports its no_new_privs and tries a write
# outside its scratch dir; prints the result as JSON, or the refusal.
SANDBOXED_RUN = r"""
import asyncio, json, sys
from taled.errors import Unavailable
from taled.sandbox.sandbox import run_python
from taled.settings import SandboxSettings
code = (
    "import re\n"
    "print(re.search(r'NoNewPrivs:\\s*(\\d)', open('/proc/self/status').read())[1])\n"
    f"open({sys.argv[3]!r}, 'w')\n"
)
settings = SandboxSettings(timeout_seconds=20, isolation=sys.argv[1])
try:
    r = asyncio.run(run_python(code, settings, scratch_root=sys.argv[2], audit_hooks=False))
except Unavailable as exc:
    print(json.dumps({"unavailable": str(exc)}))
else:
    print(json.dumps({"out": r.stdout + r.stderr, "layers": list(r.kernel_layers)}))
"""


def _unit_settings(text: str) -> dict[str, str]:
    """The [Service] section's settings (the unit sets each key once)."""
    settings: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key not in settings, f"{key} is set twice"
            settings[key] = value
    return settings


def test_checked_in_unit_sets_the_hardening_directives() -> None:
    """systemd/taled.service sets every hardening directive the sandbox and a GPU allow."""
    settings = _unit_settings(CHECKED_IN_UNIT.read_text())
    assert {key: settings.get(key) for key in HARDENING} == HARDENING


def test_checked_in_unit_leaves_out_what_breaks_acting_the_sandbox_or_the_gpu() -> None:
    """ProtectHome, PrivateTmp, ProtectKernelTunables... are absent, as docs/systemd.md says."""
    settings = _unit_settings(CHECKED_IN_UNIT.read_text())
    assert [key for key in LEFT_OUT if key in settings] == []


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_at_most_medium(tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates the unit's exposure at most MAX_EXPOSURE."""
    assert SYSTEMD_ANALYZE is not None
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--user", str(CHECKED_IN_UNIT)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze is older than 252 (no --offline)")
    found = re.search(r"Overall exposure level for taled\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE, result.stdout


def _as_the_unit_runs(variant: str, isolation: str, tmp_path: Path) -> dict[str, Any]:
    """Run SANDBOXED_RUN as an ordinary uid the way the unit would: no_new_privs, an empty
    bounding set, and in a user, mount, UTS and IPC namespace with systemd's mounts."""
    from tests.test_sandbox import _non_root_runner

    prefix = _non_root_runner(tmp_path)
    unshare = shutil.which("unshare")
    if prefix is None or unshare is None:
        pytest.skip("needs root, unshare and setpriv to start an unprivileged daemon")
    scratch = Path(tempfile.mkdtemp(prefix="tale-unit-scratch-"))
    scratch.chmod(0o777)
    # Not /tmp: the sandbox has a private one, where a write succeeds and stays inside.
    outside = REPO / f"tale-escape-{uuid.uuid4().hex}"
    argv = [
        *prefix,
        "--no-new-privs",
        "--bounding-set=-all",
        unshare,
        "--user",
        "--map-current-user",
        "--mount",
        "--uts",
        "--ipc",
        "--keep-caps",
        sys.executable,
        "-c",
        SYSTEMD_MOUNTS,
        variant,
        sys.executable,
        "-c",
        SANDBOXED_RUN,
        isolation,
        str(scratch),
        str(outside),
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert not outside.exists()
        outcome: dict[str, Any] = json.loads(proc.stdout)
        return outcome
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        outside.unlink(missing_ok=True)


@pytest.mark.parametrize("isolation", ["bwrap", "builtin"])
def test_the_sandbox_runs_and_holds_under_the_units_restrictions(
    isolation: str, tmp_path: Path
) -> None:
    """Under NoNewPrivileges, no capabilities and the unit's namespaces and mounts, a
    sandboxed run still builds every kernel layer, and a write outside it fails."""
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    outcome = _as_the_unit_runs("unit", isolation, tmp_path)
    assert "layers" in outcome, outcome
    assert outcome["out"].startswith("1\n"), outcome  # no_new_privs inside too
    assert any(error in outcome["out"] for error in ("[Errno 2]", "[Errno 13]", "[Errno 30]"))
    assert {"userns", "mountns", "pidns", "netns", "seccomp"} <= set(outcome["layers"])


@pytest.mark.parametrize("isolation", ["bwrap", "builtin"])
def test_protect_kernel_tunables_would_stop_the_sandbox_which_refuses(
    isolation: str, tmp_path: Path
) -> None:
    """Why the unit has no ProtectKernelTunables: with /proc/sys covered, the sandbox cannot
    mount its own /proc in a nested user namespace, and refuses to run (fails closed)."""
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    outcome = _as_the_unit_runs("tunables", isolation, tmp_path)
    assert "proc" in outcome.get("unavailable", ""), outcome
