"""The dependency matrix: pyproject.toml's lower bounds are the versions `make test-min` really tests.

`make test-min` installs the package in .venv-min with tests/min-constraints.txt as pip constraints, so the lowest
versions we declare are the ones the oracle suite runs on. These tests keep the declared bounds, the pins and the
documented versions from drifting apart, and check what happens below the lowest transformers.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
MIN_CONSTRAINTS = ROOT / "tests" / "min-constraints.txt"
# Both ends of the matrix run the one torch build of the local wheel store: its lower bound is declared, not tested.
NOT_PINNED = {"torch"}


def lower_bounds(requirements: list[str]) -> dict[str, Version | None]:
    """``>=`` bound of each requirement (None: no lower bound)."""
    bounds = {}
    for text in requirements:
        requirement = Requirement(text)
        lower = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        bounds[canonicalize_name(requirement.name)] = lower[0] if lower else None
    return bounds


def declared_lower_bounds() -> dict[str, Version | None]:
    """The runtime dependencies' and the ``gguf`` extra's bounds: all of them are pinned at the low end."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return lower_bounds([*project["dependencies"], *project["optional-dependencies"]["gguf"]])


def declared_test_lower_bounds() -> dict[str, Version | None]:
    """The ``test`` extra's bounds: a test tool is pinned at the low end only where it matters there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return lower_bounds(project["optional-dependencies"]["test"])


def pinned_versions() -> dict[str, Version]:
    pins = {}
    for line in MIN_CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_min_constraints_pin_exactly_the_declared_lower_bounds():
    declared = {name: bound for name, bound in declared_lower_bounds().items() if name not in NOT_PINNED}
    assert None not in declared.values(), f"every dependency needs a tested lower bound: {declared}"
    pins = pinned_versions()
    test_tools = declared_test_lower_bounds()
    assert {name: pins[name] for name in pins if name not in declared} == {
        name: test_tools.get(name) for name in pins if name not in declared
    }, "a pinned test tool must be pinned at the test extra's lower bound"
    assert {name: pins.get(name) for name in declared} == declared


def test_transformers_older_than_the_lower_bound_is_refused_with_the_fix(monkeypatch):
    # A stand-in for transformers 5.0-5.3, whose configs are plain classes built in __init__, not dataclasses.
    old_transformers = types.ModuleType("transformers")
    old_transformers.__version__ = "5.3.0"
    for name in ("LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config"):
        setattr(old_transformers, name, type(name, (), {"validate_rope": lambda self, ignore_keys=None: None}))
    monkeypatch.setitem(sys.modules, "transformers", old_transformers)
    # The file as a checkpoint carries it (trust_remote_code loads it alone, outside the package).
    path = ROOT / "optimum_olica" / "modeling" / "configuration_olica.py"
    spec = importlib.util.spec_from_file_location("configuration_olica_on_old_transformers", path)
    lowest = declared_lower_bounds()["transformers"]
    with pytest.raises(ImportError, match=rf"transformers>={lowest},<6.*transformers 5\.3\.0.*pip install"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_documented_lowest_versions_are_the_pins():
    lines = (ROOT / "docs" / "format.md").read_text().splitlines()
    row = next((i for i, line in enumerate(lines) if line.startswith("| lowest")), None)
    assert row is not None, "docs/format.md lost the lowest row of its table of supported versions"
    documented = dict(zip(table_cells(lines[row - 2]), table_cells(lines[row])))  # header, separator, lowest
    pins = pinned_versions()
    in_table = {name: pins[canonicalize_name(name)] for name in documented if canonicalize_name(name) in pins}
    assert in_table, "the table of supported versions in docs/format.md names no pinned package"
    assert {name: Version(documented[name]) for name in in_table} == in_table
