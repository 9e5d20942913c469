"""Imports point down the layers, never up:

    veil.cli -> veil.orchestrate -> veil.validators -> veil.pipelines -> veil.transforms

Every module under ``pipelines/`` and ``transforms/`` (and ``validators/``) is parsed with
``ast``, imports inside functions included, so a lazy import that runs back up fails here
too. Orchestration (plan, run, validate, report) lives in ``veil.orchestrate``, above both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Packages (folders of the ``veil`` package) and the higher layers none of their modules
#: may import.
FORBIDDEN = {
    "transforms": ("veil.pipelines", "veil.validators", "veil.orchestrate", "veil.cli"),
    "pipelines": ("veil.validators", "veil.orchestrate", "veil.cli"),
    "validators": ("veil.orchestrate", "veil.cli"),
}

#: The arrows still running up, each with its reason; the test fails when one goes, so that
#: it is taken off this list. ``veil pool --from DATASET`` reads a Veil input with the run's
#: source readers (the pool builder belongs above pipelines/; moving it is its own change).
KNOWN = {"veil.transforms.pool:veil.pipelines.sources"}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, the module ``veil.<package>.<name>``:
    ``import a.b``, ``from a import b`` (as ``a.b`` too: b may be a module), relative imports
    resolved, and ``importlib.import_module("...")`` with a literal name."""
    package = module.rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    """One line per offending import statement."""
    lines: dict[int, str] = {}
    for line, name in imported_modules(source, module):
        if line not in lines and any(name == f or name.startswith(f + ".") for f in forbidden):
            lines[line] = name
    return [f"{module}:{line} imports {name}" for line, name in sorted(lines.items())]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_higher_layer(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {ROOT / package}"
    found, known = [], set()
    for path in files:
        module = "veil." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for violation in violations(path.read_text(), module, FORBIDDEN[package]):
            arrow = f"{module}:{violation.split(' imports ')[1]}"
            if arrow in KNOWN:
                known.add(arrow)
            else:
                found.append(violation)
    assert not found, "imports that run up the layers (move the shared code below both):\n" + "\n".join(found)
    gone = {k for k in KNOWN if k.startswith(f"veil.{package}.")} - known
    assert not gone, f"no longer imported, take off KNOWN: {sorted(gone)}"


def test_the_check_sees_every_form_of_import():
    source = """
import veil.validators.report
from veil.validators import validate
from veil import orchestrate
from ..validators.gates import load_gates
from . import sinks
import importlib

def later():
    from veil.cli import main
    importlib.import_module("veil.validators.fid")
"""
    found = violations(source, "veil.pipelines.driver", FORBIDDEN["pipelines"])
    assert [f.split(" imports ")[1] for f in found] == [
        "veil.validators.report", "veil.validators", "veil.orchestrate", "veil.validators.gates",
        "veil.cli", "veil.validators.fid"]
    assert violations("from veil.pipelines.sinks import atomic_write_bytes\n", "veil.validators.x",
                      FORBIDDEN["validators"]) == []
