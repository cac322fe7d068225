"""The daemon's layout: one folder per service, and the imports between them.

``taled/`` keeps a few shared modules at its top; everything else lives in a
service's folder. Which service may import which is declared here, once: an import
that crosses a line not drawn below fails, so a new dependency is a decision made
in this file, not an accident. The tables live in ``taled/db/store.py``; the
services that still read another's tables directly are listed as debt, and the
list may only shrink.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import taled

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
    "daemon": {"db", "tasks", "checkpoints", "chat", "reporting", "tools"},
    "doctor": {"checkpoints"},
    "__main__": {"app", "daemon"},
}

# Modules outside db/ that still import table objects from taled.db.store. Debt: each
# should go through a method of the store instead. Nothing may be added here.
TABLE_DEBT: dict[str, set[str]] = {
    "taled.chat.conversations": {"conversation_tasks", "conversations", "messages"},
    "taled.learning.engine": {"model_calls", "task_outcomes", "tasks", "transitions"},
    "taled.learning.memory": {"task_embeddings", "task_outcomes"},
    "taled.reporting.monitor": {"model_calls", "violations"},
}


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


def test_only_the_store_and_the_listed_debt_import_tables() -> None:
    """Table objects of taled/db/store.py are imported by no new module outside db/."""
    extra = []
    for module, tree in _modules().items():
        if _service(module) == "db":
            continue
        for node in _imports(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "taled.db.store":
                tables = {a.name for a in node.names if a.name.islower()} - {"new_task_id"}
                beyond = tables - TABLE_DEBT.get(module, set())
                if beyond:
                    extra.append(f"{module}: {sorted(beyond)}")
    assert extra == []


def test_the_debt_list_names_only_imports_that_still_exist() -> None:
    """An entry paid off is removed from TABLE_DEBT, so the list only shrinks."""
    modules = _modules()
    stale = []
    for module, tables in TABLE_DEBT.items():
        found: set[str] = set()
        for node in _imports(modules[module]):
            if isinstance(node, ast.ImportFrom) and node.module == "taled.db.store":
                found |= {a.name for a in node.names}
        if not tables <= found:
            stale.append(f"{module}: {sorted(tables - found)}")
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
