"""Configuration: documented defaults, layering, and typos that name the key."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taled.errors import ConfigError
from taled.settings import Settings, load_settings, parse_model_spec
from tests import etc_toml
from tests.harness import Home

ETC = Path(__file__).resolve().parent.parent / "etc" / "taled.toml"


def _defaults() -> dict[str, Any]:
    return Settings().model_dump()


def test_etc_taled_toml_equals_the_settings_defaults() -> None:
    """etc/taled.toml documents exactly the settings model's defaults."""
    assert tomllib.loads(ETC.read_text()) == _defaults()


def test_etc_taled_toml_is_rendered_from_the_settings_docstrings() -> None:
    """The comments are the settings' docstrings (regenerate: python -m tests.etc_toml)."""
    assert ETC.read_text() == etc_toml.render()


def test_every_setting_is_documented_in_etc() -> None:
    """Every key in etc/taled.toml has a comment line right above it."""
    lines = ETC.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#"), f"undocumented setting: {line}"


def test_user_file_overrides_defaults(tmp_path: Path) -> None:
    """A value in the user's taled.toml replaces the default."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[queue]\nworkers = 5\n")
    assert load_settings(cfg).queue.workers == 5


def test_environment_overrides_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TALE_QUEUE__WORKERS wins over the user's file."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[queue]\nworkers = 5\n")
    monkeypatch.setenv("TALE_QUEUE__WORKERS", "7")
    assert load_settings(cfg).queue.workers == 7


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[queue]\nworkerz = 3\n", "queue.workerz"),
        ("[models.llamacpp]\nn_ctxx = 1024\n", "models.llamacpp.n_ctxx"),
        ("[daemon]\nlog_levle = 'info'\n", "daemon.log_levle"),
        ("bogus = 1\n", "bogus"),
        ("[nope]\nx = 1\n", "nope"),
        ("[models.pool]\nmemory_floor = 1\n", "models.pool.memory_floor"),
        ("[models.ollama]\nnumctx = 1\n", "models.ollama.numctx"),
        ("[models.openai]\napi_key = 'x'\n", "models.openai.api_key"),
    ],
)
def test_a_typo_in_any_table_is_an_error_naming_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    """An unknown key, at any depth, is rejected with its dotted name."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_a_typo_in_an_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """TALE_QUEUE__WORKERZ is rejected, not ignored."""
    monkeypatch.setenv("TALE_QUEUE__WORKERZ", "3")
    with pytest.raises(ConfigError, match=r"queue\.workerz"):
        load_settings(None)


def test_an_out_of_range_value_is_an_error(tmp_path: Path) -> None:
    """workers = 0 is rejected with the field's name and bound."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[queue]\nworkers = 0\n")
    with pytest.raises(ConfigError, match=r"queue\.workers.*greater than or equal to 1"):
        load_settings(cfg)


def test_a_loop_unit_range_that_is_empty_is_an_error(tmp_path: Path) -> None:
    """loops.min_chars above loops.max_chars is rejected, naming the table."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[loops]\nmin_chars = 500\nmax_chars = 100\n")
    with pytest.raises(ConfigError, match=r"loops.*min_chars must not exceed max_chars"):
        load_settings(cfg)


def test_an_unknown_backend_is_an_error(tmp_path: Path) -> None:
    """A role bound to a backend this build lacks is rejected at load."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text('[models]\ntask = "nosuch:model"\n')
    with pytest.raises(ConfigError, match="unknown backend 'nosuch'"):
        load_settings(cfg)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ('fallback = "gpt:4"', "unknown backend 'gpt'"),
        ('task = "openai:http://gpu-box:8000/v1"', "must name the model after '#'"),
        ('task = "openai:gpu-box:8000/v1#m"', "must start with http:// or https://"),
        ('ux = "ollama:qwen2.5:"', "must look like NAME or NAME:TAG"),
        ('ux = "smollm2"', "must look like 'backend:model'"),
    ],
)
def test_a_malformed_model_binding_is_an_error_that_shows_the_form(
    tmp_path: Path, spec: str, problem: str
) -> None:
    """Each backend's spec form is checked at load, with what is wrong and an example."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text(f"[models]\n{spec}\n")
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_settings(cfg)


@given(
    st.one_of(
        st.builds(lambda m: f"llamacpp:{m}", st.text(min_size=1).filter(lambda t: t.strip())),
        st.builds(
            lambda n, t: f"ollama:{n}:{t}",
            st.from_regex(r"[a-z0-9.\-]{1,12}", fullmatch=True),
            st.from_regex(r"[a-z0-9.\-]{1,8}", fullmatch=True),
        ),
        st.builds(
            lambda h, m: f"openai:http://{h}:8000/v1#{m}",
            st.from_regex(r"[a-z0-9\-]{1,12}", fullmatch=True),
            st.from_regex(r"[A-Za-z0-9.\-]{1,20}", fullmatch=True),
        ),
    )
)
def test_a_parsed_model_spec_round_trips_through_its_label(spec: str) -> None:
    """parse(spec).label parses to the same binding: what `tale models` shows is config."""
    parsed = parse_model_spec(spec)
    assert parse_model_spec(parsed.label) == parsed


@given(st.text(max_size=60))
def test_any_text_as_a_model_spec_parses_or_raises_value_error(spec: str) -> None:
    """No input crashes the spec parser with anything but a ValueError that says why."""
    try:
        parse_model_spec(spec)
    except ValueError as exc:
        assert str(exc)


def test_broken_toml_is_an_error_with_the_file(tmp_path: Path) -> None:
    """A syntax error names the file."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[queue\n")
    with pytest.raises(ConfigError, match=str(cfg)):
        load_settings(cfg)


def test_taled_exits_2_naming_the_bad_key(home: Home) -> None:
    """taled refuses to start on a typo in the user's file, exit code 2, key named."""
    home.write_config("[runner]\nmax_tokenz = 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "taled"], env=home.env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "runner.max_tokenz" in proc.stderr
    assert not home.socket.exists()


def test_role_threads_accepts_known_roles_only(tmp_path: Path) -> None:
    """role_threads takes ux/task with a positive count; another key is an error naming it."""
    cfg = tmp_path / "taled.toml"
    cfg.write_text("[models.llamacpp.role_threads]\nux = 1\ntask = 1\n")
    assert load_settings(cfg).models.llamacpp.role_threads == {"ux": 1, "task": 1}
    cfg.write_text("[models.llamacpp.role_threads]\nuxx = 1\n")
    with pytest.raises(ConfigError, match="role_threads"):
        load_settings(cfg)
    cfg.write_text("[models.llamacpp.role_threads]\nux = 0\n")
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        load_settings(cfg)


def test_the_readme_example_config_is_valid(tmp_path: Path) -> None:
    """The model configuration shown in the README loads as written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    match = re.search(r"```toml\n# ~/.config/tale/taled.toml\n(.*?)```", readme, re.S)
    assert match, "the README's example config block is missing"
    cfg = tmp_path / "taled.toml"
    cfg.write_text(match.group(1))
    models = load_settings(cfg).models
    assert (models.task, models.fallback) == ("ollama:qwen2.5:14b", "llamacpp:smollm2-135m")
