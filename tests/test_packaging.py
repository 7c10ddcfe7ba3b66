"""Packaging facts a new user relies on: the license, the extras, and no unused dependency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-learn": "sklearn", "huggingface_hub": "huggingface_hub"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_license_file_is_the_apache_license_pyproject_names():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_no_extra_repeats_a_core_dependency():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        assert not core & {_name(r) for r in requirements}, extra


def test_every_core_dependency_is_imported():
    sources = "\n".join(
        p.read_text() for folder in ("kron_transformers", "recipes") for p in (ROOT / folder).rglob("*.py")
    )
    for requirement in PYPROJECT["project"]["dependencies"]:
        module = IMPORT_NAMES.get(_name(requirement), _name(requirement))
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.MULTILINE), requirement


def test_install_lines_install_from_source():
    readme = (ROOT / "README.md").read_text()
    card = (ROOT / "model_cards" / "kron_transformers.md").read_text()
    assert "pypi.org" not in readme + card
    assert not re.search(r"pip install kron[_-]transformers", readme + card)
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', readme):
        assert extra in extras, extra
