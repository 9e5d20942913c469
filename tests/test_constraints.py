"""constraints.txt: the exact versions every install uses (Makefile, CI, deploy/Dockerfile).

Two installs of one commit made hours apart resolved different versions of two packages;
the constraints file pins one tested environment. These tests
keep it consistent with what pyproject.toml and the Makefile ask for, and check that the
environment the tests run in is that one (CI installs from scratch, so a green CI is a tested
lock).
"""
from __future__ import annotations

import re
import tomllib
from importlib import metadata

from helpers import REPO, makefile_nodeps
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def pins() -> dict[str, str]:
    """Canonical name -> pinned version, from constraints.txt (every line must be name==version)."""
    out: dict[str, str] = {}
    for n, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"constraints.txt line {n}: {line!r} is not name==version"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"constraints.txt line {n}: {name} pinned twice"
        out[name] = m.group(2)
    return out


def declared() -> list[Requirement]:
    """Requirements of pyproject.toml (dependencies and the dev extra) and the Makefile's NODEPS."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    reqs += [Requirement(r) for r in makefile_nodeps()]
    return reqs


def test_constraints_pin_every_declared_package_inside_its_declared_range():
    pinned = pins()
    assert len(pinned) > 100, "the lock lists the whole environment, not only direct dependencies"
    never = {"veil", "pip"}  # the project itself; pip is the installer
    assert not never & set(pinned), never & set(pinned)
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "setuptools":
            continue  # pip freeze leaves it out; pyproject's own bound (<81) applies
        assert name in pinned, f"{req} is declared but not pinned in constraints.txt (run make lock)"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside {req} (run make lock)"


def test_every_make_install_goes_through_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, re.MULTILINE)
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert len(installs) == 3 and all("$(PIN)" in line for line in installs), installs
    # deploy/Dockerfile's installs: tests/test_deploy.py::test_dockerfile_installs_veil_as_the_makefile_does


def test_this_environment_is_the_locked_one():
    """What CI certifies: the tests ran on exactly the pinned versions. A package installed by
    hand beside them (not in the lock) is not checked."""
    wrong = []
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # platform-only packages (CUDA libraries) are not needed everywhere
        # A local label (torch 2.14.1+cpu from the CPU index) is the same release.
        if Version(installed).public != Version(version).public:
            wrong.append(f"{name} {installed} (constraints.txt: {version})")
    assert not wrong, ("installed versions differ from constraints.txt; run `make install`, or "
                       "`make lock` after a deliberate upgrade: " + "; ".join(wrong))
