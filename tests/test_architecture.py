"""ARCHITECTURE.md exists, names every package folder, and is what the sources cite (DESIGN.md is not shipped)."""

from __future__ import annotations

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kron_transformers"


def test_architecture_describes_each_folder_and_the_layers_the_sources_cite():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for folder in [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()] + ["recipes", "benchmarks"]:
        assert f"{folder}/" in text, folder
    layers = {int(n) for n in re.findall(r"^(\d)\. \*\*", text, re.MULTILINE)}
    sources = [(path, path.read_text()) for path in PACKAGE.rglob("*.py")]
    for path, source in sources:
        assert "DESIGN.md" not in source, path
        for cited in re.findall(r"ARCHITECTURE\.md layer (\d)", source):
            assert int(cited) in layers, (path, cited)
        for section in re.findall(r'ARCHITECTURE\.md, "([^"]+)"', source):
            assert f"## {section}\n" in text, (path, section)
