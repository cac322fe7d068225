"""The distribution's metadata: a name of its own on the package index, the commands
people type, and a license file that says what the metadata declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_distribution_is_not_named_after_the_unrelated_tale_on_the_index() -> None:
    # `pip download --no-deps tale` fetches a MUD framework; `tale-worker` is ours.
    assert PROJECT["name"] == "tale-worker"


def test_the_commands_stay_tale_and_taled() -> None:
    assert set(PROJECT["scripts"]) == {"tale", "taled"}


def test_the_license_file_is_the_license_the_metadata_declares() -> None:
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text


def test_the_classifiers_name_linux_and_the_python_versions_tested() -> None:
    classifiers = set(PROJECT["classifiers"])
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert f"Programming Language :: Python :: {PROJECT['requires-python'][2:]}" in classifiers
