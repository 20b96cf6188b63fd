"""
The layout of docs/architecture.md, checked against the code: each room (a
package of mqttsvc) imports only the rooms its docstring says it may, the
rooms form no cycle, and the modules every room shares import nothing of
ours.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mqttsvc

PACKAGE = Path(mqttsvc.__file__).parent
ROOMS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
#: Modules at the top that every room may import, and that import nothing of
#: ours themselves.
SHARED = ("config", "records")
#: The entry points that wire the rooms together: they may import any room.
WIRING = ("tap", "cli", "__main__")


def _room_of(module: str) -> str:
    """The room (or top-level module) a dotted mqttsvc module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mqttsvc"


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Every mqttsvc module a file imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mqttsvc":
                # A submodule by name, or a name of the package itself.
                found.update(
                    f"mqttsvc.{alias.name}" if _is_module(alias.name) else "mqttsvc"
                    for alias in node.names
                )
            elif node.module.startswith("mqttsvc."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mqttsvc."))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write the absolute mqttsvc path")
    return found


def _may_import(room: str) -> set[str]:
    """The rooms a room's package docstring says it may import."""
    doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text())) or ""
    match = re.search(r"^May import: ([a-z_, ]+|nothing of mqttsvc)\.$", doc, re.M)
    assert match, f"mqttsvc/{room}/__init__.py: the docstring needs a 'May import: ...' line"
    if match.group(1) == "nothing of mqttsvc":
        return set()
    allowed = {name.strip() for name in match.group(1).split(",")}
    unknown = allowed - set(ROOMS) - set(SHARED)
    assert not unknown, f"mqttsvc/{room}: 'May import' names unknown rooms {sorted(unknown)}"
    return allowed


def _uses(room_path: Path) -> dict[str, set[str]]:
    """For each room a package imports from, which of its files do."""
    uses: dict[str, set[str]] = {}
    for path in sorted(room_path.rglob("*.py")):
        for module in _imports(path):
            other = _room_of(module)
            if other != room_path.name:
                uses.setdefault(other, set()).add(str(path.relative_to(PACKAGE.parent)))
    return uses


def test_the_rooms_are_the_documented_ones() -> None:
    """
    The packages are the rooms that docs/architecture.md describes, and
    the top of mqttsvc holds only the shared modules and the wiring.
    """
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for room in ROOMS:
        assert f"`mqttsvc/{room}/`" in doc, f"docs/architecture.md does not describe {room}"
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == sorted(["__init__", *SHARED, *WIRING, "rpcclient", "client"]), (
        f"modules at the top of mqttsvc: {top}"
    )


def test_each_room_imports_only_what_its_docstring_allows() -> None:
    """
    Every import from one room into another is one the importing room's
    docstring names under 'May import'.
    """
    problems = []
    for room in ROOMS:
        allowed = _may_import(room) | {"mqttsvc"}
        for other, files in sorted(_uses(PACKAGE / room).items()):
            if other not in allowed:
                problems.append(f"{room} imports {other} (in {', '.join(sorted(files))})")
    assert problems == []


def test_the_rooms_form_no_cycle() -> None:
    """
    The 'May import' lines order the rooms: no room may (even through
    others) import itself.
    """
    graph = {room: _may_import(room) & set(ROOMS) for room in ROOMS}
    done: set[str] = set()

    def visit(room: str, path: tuple[str, ...]) -> None:
        assert room not in path, f"cycle: {' -> '.join((*path, room))}"
        if room in done:
            return
        for other in sorted(graph[room]):
            visit(other, (*path, room))
        done.add(room)

    for room in ROOMS:
        visit(room, ())


def test_the_shared_modules_import_nothing_of_ours() -> None:
    """
    config and records are imported by every room, so they import no room
    (nor each other): a change in a room can never reach them.
    """
    for name in SHARED:
        assert _imports(PACKAGE / f"{name}.py") == set(), name
    assert {_room_of(m) for m in _imports(PACKAGE / "client.py")} == {"rpcclient"}


def test_the_check_would_catch_a_forbidden_import(tmp_path: Path) -> None:
    """
    The import scan sees imports inside functions too (where a late import
    would otherwise hide a dependency).
    """
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from mqttsvc.control.web import WebApp\n    return WebApp\n")
    assert {_room_of(m) for m in _imports(module)} == {"control"}


def test_the_readme_diagram_is_in_step_with_the_architecture() -> None:
    """
    Every service the README's diagram shows, with the room it names, is in
    the service tree of docs/architecture.md with the same room.
    """
    readme = (PACKAGE.parent / "README.md").read_text()
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    diagram = readme[readme.index("twistd mqttsvc ──") :].split("```")[0]
    boxes = re.findall(r"[├└]── (\w+)\s+(\w+):", diagram)
    assert len(boxes) >= 6, diagram
    for service, room in boxes:
        assert room in ROOMS, f"README: {service} is in {room}, which is not a room"
        assert re.search(rf"[├└]── {service}\s+{room}:", doc), (
            f"docs/architecture.md's tree lacks {service} in {room}"
        )
