"""The door rules of the rooms, read from the source with `ast`: which package may import
which. Every import counts, wherever it sits in a module (a function's own import too).

- infrastructure/persistence and infrastructure/security import no other room of
  infrastructure, only the modules beside the rooms that every room may use
  (`infrastructure.errors`, `infrastructure.internals`, `infrastructure.metrics`,
  `infrastructure.logs`, `infrastructure.tracing`);
- infrastructure/projection imports persistence only (and those);
- infrastructure/live imports persistence and security only (and those);
- infrastructure/relay imports persistence only (and those);
- nothing in infrastructure imports schema, commands, queries, domain, events, processes,
  or the composition root (`orderstream.bootstrap`, `orderstream.cli`);
- domain imports no infrastructure and no library that does I/O.

And no module connects or reads settings while it is imported.
"""

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
INFRASTRUCTURE = "orderstream.infrastructure"
ROOMS = ("persistence", "projection", "live", "relay", "security", "web")
APPLICATION = tuple(f"orderstream.{name}" for name in ("schema", "commands", "queries", "domain", "events",
                                                       "processes", "bootstrap", "cli"))
IO_LIBRARIES = ("sqlalchemy", "starlette", "strawberry", "graphql", "asyncpg", "aiosqlite", "alembic", "uvicorn",
                "httpx", "redis", "limits", "cross_web", "socket", "sqlite3", "subprocess")


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name."""
    found = {}
    for package, folder in PACKAGE_DIR.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            parts = [] if path.stem == "__init__" else [path.stem]
            found[".".join([package, *parts])] = path
    for package, folder in PACKAGE_DIR.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("").parts
            if "versions" in relative or relative[-1] == "env":
                continue  # migration scripts: alembic loads them by path
            name = ".".join([package, *relative[:-1], *([] if relative[-1] == "__init__" else relative[-1:])])
            found.setdefault(name, path)
    return found


MODULES = modules()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{MODULES[self.importer].relative_to(ROOT)}:{self.line} imports {self.imported}"


def imports_of(name: str) -> list[Import]:
    """The modules `name` imports, absolute, relative ones resolved; `from a import b` is
    a.b when that is a module, else a."""
    path = MODULES[name]
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append(Import(name, candidate if candidate in MODULES else base, node.lineno))
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def room_of(name: str) -> str | None:
    for room in ROOMS:
        if within(name, f"{INFRASTRUCTURE}.{room}"):
            return room
    return None


def imports_in(package: str) -> list[Import]:
    return [found for name in MODULES if within(name, package) for found in imports_of(name)]


# Beside the rooms, for every room: the errors any may raise, the reaches into
# strawberry's and graphql-core's internals, named once, the metrics' instruments, the
# logs' format and the tracing's spans.
SHARED = (f"{INFRASTRUCTURE}.errors", f"{INFRASTRUCTURE}.internals", f"{INFRASTRUCTURE}.metrics",
          f"{INFRASTRUCTURE}.logs", f"{INFRASTRUCTURE}.tracing")

# A room may import itself, the rooms named here, and SHARED.
ROOM_RULES = {
    "persistence": set(),
    "security": set(),
    "projection": {"persistence"},
    "live": {"persistence", "security"},
    "relay": {"persistence"},
}


def test_the_modules_and_their_imports_are_found():
    assert {"orderstream.bootstrap", "orderstream.schema.app", "orderstream.infrastructure.errors",
            "orderstream.infrastructure.persistence.event_store"} <= set(MODULES)
    # The rules below hold only if imports are seen at all: these are known to be there.
    projection = {found.imported for found in imports_in(f"{INFRASTRUCTURE}.projection")}
    assert any(within(name, f"{INFRASTRUCTURE}.persistence") for name in projection), projection
    bootstrap = {found.imported for found in imports_of("orderstream.bootstrap")}
    assert {f"{INFRASTRUCTURE}.settings", "orderstream.schema.app"} <= bootstrap, bootstrap
    assert all(room_of(name) for name in MODULES if within(name, INFRASTRUCTURE)
               and name not in (INFRASTRUCTURE, *SHARED, f"{INFRASTRUCTURE}.settings"))


@pytest.mark.parametrize("room", ROOM_RULES)
def test_a_room_imports_only_the_rooms_its_rule_allows(room: str):
    allowed = {room, *ROOM_RULES[room]}
    broken = [str(found) for found in imports_in(f"{INFRASTRUCTURE}.{room}")
              if within(found.imported, INFRASTRUCTURE) and found.imported not in SHARED
              and room_of(found.imported) not in allowed]
    assert not broken, f"{room} may import only {sorted(allowed - {room}) or 'no other room'} and {SHARED}:\n" + \
        "\n".join(broken)


def test_infrastructure_knows_nothing_of_the_application():
    broken = [str(found) for found in imports_in(INFRASTRUCTURE)
              if any(within(found.imported, package) for package in APPLICATION)]
    assert not broken, "\n".join(broken)


def test_the_domain_imports_no_infrastructure_and_no_io():
    broken = [str(found) for found in imports_in("orderstream.domain")
              if within(found.imported, INFRASTRUCTURE)
              or any(within(found.imported, library) for library in IO_LIBRARIES)]
    assert not broken, "\n".join(broken)


# Calls that connect or read settings; made at import time, they would tie a module to
# the environment it was first imported in.
AT_IMPORT_FORBIDDEN = {"create_engine", "create_async_engine", "connect", "getenv", "load", "from_environ",
                       "Settings", "EventStore", "ReadStore"}


def import_time_nodes(tree: ast.Module) -> list[ast.AST]:
    """The nodes that run when the module is imported: all but function bodies (a
    function's defaults and decorators do run)."""
    pending, found = list(tree.body), []
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            pending += [default for default in node.args.kw_defaults if default is not None]
            pending += [*node.args.defaults, *getattr(node, "decorator_list", [])]
            continue
        found.append(node)
        pending += ast.iter_child_nodes(node)
    return found


def is_os_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", "") == "os"


def test_no_module_connects_or_reads_settings_when_imported():
    # `os.environ` itself may be named (a default argument binds the live mapping); reading
    # from it may not.
    broken = []
    for path in MODULES.values():
        for node in import_time_nodes(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in AT_IMPORT_FORBIDDEN:
                    broken.append(f"{where} calls {called}")
                elif isinstance(func, ast.Attribute) and is_os_environ(func.value):
                    broken.append(f"{where} reads os.environ")
                elif any(is_os_environ(argument) for argument in node.args):
                    broken.append(f"{where} reads os.environ")
            elif isinstance(node, ast.Subscript) and is_os_environ(node.value):
                broken.append(f"{where} reads os.environ")
    assert not broken, "\n".join(broken)
