"""Every Python package of the repository is in its distribution: ``[tool.setuptools] packages``
lists packages explicitly, and a subpackage missing there is absent from a wheel or an image
(an editable install, which reads the folders, hides the gap)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = sorted(ROOT.glob("libs/*/pyproject.toml")) + sorted(ROOT.glob("services/*/pyproject.toml"))


@pytest.mark.parametrize("pyproject", PROJECTS, ids=lambda p: p.parent.name)
def test_every_package_folder_is_listed(pyproject):
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(pyproject.parent).parts)
             for init in pyproject.parent.rglob("__init__.py")
             if not any(part.endswith(".egg-info") or part in {"build", "tests"}
                        for part in init.relative_to(pyproject.parent).parts)}
    assert listed == found


def test_the_projects_are_found():
    assert {p.parent.name for p in PROJECTS} >= {"hecommon", "encoder", "evaluator", "aggregator", "orchestrator"}
