"""The daemon's layout: one folder per service, and the imports between them.

``taled/`` keeps a few shared modules at its top; everything else lives in a
service's folder. Which service may import which is declared here, once: an import
that crosses a line not drawn below fails, so a new dependency is a decision made
in this file, not an accident. The tables live in ``taled/db/schema.py`` and are
read through the repositories of ``taled/db/`` (``store.py``, ``acting.py``,
``schedules.py``, ``conversations.py``, ``learning.py``, ``reporting.py``,
``usage.py``); the modules that still import tables or write SQL against them are
listed as debt, and the lists may only shrink. ``taled/db/engine.py``, how the
repositories reach SQLite, is imported by db/ alone.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

import taled
import taled.db.schema

PACKAGE = Path(taled.__file__).resolve().parent

# Modules shared by every service, at the package's top.
SHARED = {"__init__", "__main__", "app", "settings", "errors", "paths", "text", "doctor"}

# Shared modules any service may import.
COMMON = {"__init__", "errors", "settings", "paths", "text"}
# service -> the other services it may import. app wires everything.
ALLOWED: dict[str, set[str]] = {
    "db": {"tasks", "doctor"},
    "models": {"db", "tools"},
    "checkpoints": {"db"},
    "reporting": {"db"},
    "learning": {"db", "models", "tasks"},
    "sandbox": set(),
    "tools": {"sandbox", "checkpoints", "db"},
    "tasks": {"db", "models", "checkpoints", "learning", "sandbox", "tools"},
    "chat": {"db", "models", "tasks"},
    "schedules": {"db", "tasks"},
    # Telling people what tasks did: it watches the store and runs hooks in the sandbox.
    "notify": {"db", "tasks", "sandbox"},
    # Forgetting tasks: it drives each owner's own way of letting go of one.
    "retention": {"db", "checkpoints", "learning", "tasks", "tools"},
    "daemon": {
        "db",
        "tasks",
        "checkpoints",
        "chat",
        "reporting",
        "tools",
        "schedules",
        "retention",
    },
    "doctor": {"checkpoints"},
    "__main__": {"app", "daemon"},
}

# Modules outside db/ that still import table objects from taled.db.schema. Debt: each
# should go through a method of a repository in db/ instead. Nothing may be added here.
TABLE_DEBT: dict[str, set[str]] = {}

# Modules outside db/ whose SQL text names tables: raw SQL past the repositories, which
# no import shows. Debt as above; nothing may be added here.
SQL_DEBT: dict[str, set[str]] = {}

# The table objects' names (and the metadata that holds them).
SCHEMA_TABLES = {
    name for name, value in vars(taled.db.schema).items() if isinstance(value, sa.Table)
} | {"metadata"}
# The tables' names in SQL: the declared ones and the migrations' virtual (FTS5) tables.
SQL_TABLES = {t.name for t in taled.db.schema.metadata.sorted_tables} | {
    m.group(1)
    for statements in taled.db.schema.MIGRATIONS
    for statement in statements
    if (m := re.match(r"CREATE VIRTUAL TABLE (\w+)", statement))
}
# Where SQL names a table (the codebase writes SQL keywords in capitals).
_SQL_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(\w+)")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _service(module: str) -> str:
    """``taled.sandbox.sandbox`` -> ``tasks``; ``taled.app`` -> ``app``."""
    return module.split(".")[1] if "." in module else module


def _imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom | ast.Import)]


def _imported(node: ast.ImportFrom | ast.Import) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.module == "taled":
        # ``from taled import __version__`` reads the package's __init__
        return [f"taled.{'__init__' if a.name.startswith('__') else a.name}" for a in node.names]
    return [node.module] if node.module else []


def test_every_module_lives_in_a_service_folder() -> None:
    """Only the shared modules sit at taled/'s top; the rest are in service folders."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == SHARED


def test_services_import_only_what_the_layout_allows() -> None:
    """No service imports another the table above does not let it."""
    crossings = []
    for module, tree in _modules().items():
        service = _service(module)
        if service in ("app", "__init__"):
            continue
        allowed = ALLOWED.get(service, set()) | COMMON | {service}
        for node in _imports(tree):
            for name in _imported(node):
                if name.startswith("taled.") and _service(name) not in allowed:
                    crossings.append(f"{module} imports {name}")
    assert crossings == []


def test_only_db_and_the_listed_debt_import_tables() -> None:
    """Table objects of taled/db/schema.py are imported by no new module outside db/."""
    extra = []
    for module, tree in _modules().items():
        if _service(module) == "db":
            continue
        for node in _imports(tree):
            if isinstance(node, ast.Import) and "taled.db.schema" in _imported(node):
                extra.append(f"{module}: import taled.db.schema")
            elif isinstance(node, ast.ImportFrom) and node.module == "taled.db.schema":
                tables = {a.name for a in node.names if a.name in SCHEMA_TABLES}
                beyond = tables - TABLE_DEBT.get(module, set())
                if beyond:
                    extra.append(f"{module}: {sorted(beyond)}")
    assert extra == []


def test_only_db_talks_to_the_engine() -> None:
    """taled/db/engine.py (connections, writer, migrations) is imported only inside db/."""
    found = [
        f"{module} imports {name}"
        for module, tree in _modules().items()
        if _service(module) != "db"
        for node in _imports(tree)
        for name in _imported(node)
        if name == "taled.db.engine"
    ]
    assert found == []


def test_tables_are_imported_from_the_schema_only() -> None:
    """No module, test or not, takes a table from a repository that happens to hold one
    (``from taled.db.store import tasks``): an import of a table names taled.db.schema."""
    trees = dict(_modules())
    for path in sorted((PACKAGE.parent / "tests").rglob("*.py")):
        trees[str(path.relative_to(PACKAGE.parent))] = ast.parse(path.read_text("utf-8"))
    found = [
        f"{module}: from {node.module} import {alias.name}"
        for module, tree in trees.items()
        for node in _imports(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("taled.")
        and node.module != "taled.db.schema"
        for alias in node.names
        if alias.name in SCHEMA_TABLES
    ]
    assert found == []


def test_the_debt_list_names_only_imports_that_still_exist() -> None:
    """An entry paid off is removed from TABLE_DEBT, so the list only shrinks."""
    modules = _modules()
    stale = []
    for module, tables in TABLE_DEBT.items():
        found: set[str] = set()
        for node in _imports(modules[module]):
            if isinstance(node, ast.ImportFrom) and node.module == "taled.db.schema":
                found |= {a.name for a in node.names}
        if not tables <= found:
            stale.append(f"{module}: {sorted(tables - found)}")
    assert stale == []


def _tables_in_sql(tree: ast.Module) -> set[str]:
    """The tables named in a module's SQL text (its string constants, f-strings' too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= {t for t in _SQL_TABLE.findall(node.value) if t in SQL_TABLES}
    return found


def test_only_db_and_the_listed_debt_write_sql_against_tables() -> None:
    """No new module outside db/ names a table in SQL text of its own."""
    extra = []
    for module, tree in _modules().items():
        if _service(module) == "db":
            continue
        beyond = _tables_in_sql(tree) - SQL_DEBT.get(module, set())
        if beyond:
            extra.append(f"{module}: {sorted(beyond)}")
    assert extra == []


def test_the_sql_debt_list_names_only_sql_that_still_exists() -> None:
    """An entry paid off is removed from SQL_DEBT, so the list only shrinks."""
    modules = _modules()
    stale = [
        f"{module}: {sorted(tables - _tables_in_sql(modules[module]))}"
        for module, tables in SQL_DEBT.items()
        if not tables <= _tables_in_sql(modules[module])
    ]
    assert stale == []


def test_importing_the_daemon_imports_no_tui() -> None:
    """``import taled.app`` pulls in neither Textual nor the client."""
    code = (
        "import sys, taled.app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'tale_client'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
