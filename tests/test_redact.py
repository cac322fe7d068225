"""The redactor that takes credentials out of text bound for a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taled.tasks.gates.redact import REDACTED, redact

SECRETS = [
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
    "sk-" + "a1B2" * 10,
    "sk-ant-api03-" + "x9Y8" * 8,
    "ghp_" + "A1b2C3d4E5" * 4,
    "github_pat_" + "11ABC" * 6,
    "glpat-" + "abcDEF123" * 3,
    "xoxb-" + "1234567890-abcdef",
    "AKIAIOSFODNN7EXAMPLE",
    "AIza" + "Sy" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
    "hf_" + "aBcDeFgHiJ" * 4,
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "Zx8" * 5 + "qR7" * 5 + "Lm2" * 5,  # 45 mixed characters: the shape of a random key
]


@pytest.mark.parametrize("secret", SECRETS)
def test_a_known_key_shape_is_redacted(secret: str) -> None:
    """Each common credential shape is replaced, with the text around it kept."""
    out = redact(f"before {secret} after")
    assert secret not in out
    assert out.startswith("before ") and out.endswith(" after")
    assert REDACTED in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("API_KEY=hunter2hunter2", "API_KEY=[REDACTED]"),
        ('{"password": "correct horse"}', '{"password": "[REDACTED]"}'),
        ("db_password: s3cr3t!!", "db_password: [REDACTED]"),
        ("token='abcdef123'", "token='[REDACTED]'"),
    ],
)
def test_a_secret_assignment_keeps_its_name(text: str, expected: str) -> None:
    """In ``name = value`` the value goes and the name stays, so a model sees what was set."""
    assert redact(text) == expected


def test_the_daemons_own_secret_environment_values_are_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value of an environment variable named like a secret is redacted anywhere."""
    from taled.tasks.gates import redact as module

    monkeypatch.setenv("MY_SERVICE_TOKEN", "plainwordsecret")
    module._environment_secrets.cache_clear()
    try:
        assert "plainwordsecret" not in redact("the value plainwordsecret leaked")
    finally:
        module._environment_secrets.cache_clear()


@pytest.mark.parametrize(
    "text",
    [
        'Traceback (most recent call last):\n  File "main.py", line 3, in <module>\n'
        "NameError: name 'x' is not defined",
        "/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/base_events.py",
        "AssertionError: assert add(2, 3) == 5",
        "a_very_long_identifier_name_without_any_digits_in_it_at_all",
    ],
)
def test_ordinary_error_output_is_left_alone(text: str) -> None:
    """Tracebacks, paths and identifiers pass through unchanged."""
    assert redact(text) == text


@given(st.text(max_size=400))
def test_redact_never_grows_a_secret_back(text: str) -> None:
    """Redacting is idempotent and never fails, whatever the text."""
    once = redact(text)
    assert redact(once) == once
