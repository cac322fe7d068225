"""Render etc/taled.toml from the settings model: its defaults, its docstrings as comments.

Regenerate after changing a setting: ``python -m tests.etc_toml``.
tests/test_config.py pins the file equal to this rendering.
"""

from __future__ import annotations

import ast
import inspect
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import taled.settings as settings_module

ETC = Path(__file__).resolve().parent.parent / "etc" / "taled.toml"

HEADER = """\
# taled.toml: the daemon's defaults, documented.
#
# Copy the keys you want to change to $XDG_CONFIG_HOME/tale/taled.toml
# (usually ~/.config/tale/taled.toml). Environment variables override the file:
# TALE_<TABLE>__<KEY>, e.g. TALE_QUEUE__WORKERS=4. An unknown key is an error.
# tests/test_config.py pins this file equal to the settings model's defaults.
"""


def _field_docs() -> dict[tuple[str, str], str]:
    tree = ast.parse(inspect.getsource(settings_module))
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for st, nxt in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(st, ast.AnnAssign)
                and isinstance(st.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[(node.name, st.target.id)] = str(nxt.value.value)
    return docs


def _value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def _comment(text: str) -> list[str]:
    return [f"# {line.strip()}".rstrip() for line in inspect.cleandoc(text).splitlines()]


def render() -> str:
    """The full text of etc/taled.toml."""
    docs = _field_docs()
    out = [HEADER]

    def emit(obj: BaseModel, prefix: str) -> None:
        cls = type(obj)
        out.extend(_comment(cls.__doc__ or ""))
        out.append(f"[{prefix}]")
        tables: list[tuple[BaseModel, str]] = []
        for name in cls.model_fields:
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                tables.append((value, f"{prefix}.{name}"))
                continue
            out.extend(_comment(docs.get((cls.__name__, name), "")))
            out.append(f"{name} = {_value(value)}")
        out.append("")
        for sub, path in tables:
            emit(sub, path)

    root = settings_module.Settings()
    for name in type(root).model_fields:
        emit(getattr(root, name), name)
    text = "\n".join(out)
    tomllib.loads(text)  # never write a file that does not parse
    return text


if __name__ == "__main__":
    ETC.write_text(render())
    print(f"wrote {ETC}")
