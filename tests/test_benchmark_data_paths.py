"""Benchmarks that read the shared real data take its location as an argument and name what is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("quality", ["{missing}"], "data folder {missing}: missing {missing}/multi30k/train.de.gz, "),
        ("quality", ["{missing}", "--tasks", "cifar10"], "missing {missing}/cifar10/test_images.npz (DATA"),
        ("neukron", ["--multi30k", "{missing}"], "--multi30k {missing}: no train.en.gz there"),
    ],
)
def test_missing_data_is_a_clear_error(name, argv, message, tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "data")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *(arg.format(missing=missing) for arg in argv)])
    with pytest.raises(SystemExit) as stopped:
        load(name).main()
    assert stopped.value.code == 2
    assert message.format(missing=missing) in capsys.readouterr().err


def test_no_machine_specific_data_paths():
    root = BENCHMARKS.parent
    kept_rows = [*BENCHMARKS.glob("*_rows/*.json")]  # quality.py --keep-rows drops the run folders
    assert kept_rows
    for path in [root / "README.md", *BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("*.md"), *kept_rows]:
        text = path.read_text()
        assert "/work/" not in text and "shared/data" not in text, path
