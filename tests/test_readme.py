"""Every code block of README.md works as pasted.

Python blocks (```python / ```py) run in a fresh interpreter, in order, each in its own namespace, in a temporary
working folder; blocks that push to the Hub run afterwards in a second interpreter pointed at the loopback fake Hub.
Shell blocks are checked without running the slow commands: each script, module, subcommand, option and extra they
name must exist. New README sections are picked up automatically.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


pytest_plugins = ["fake_hub"]

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text("utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
NEEDS_HUB = "push_to_hub("


def _blocks(*languages: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block in one of ``languages``."""
    return [
        (README.count("\n", 0, match.start()) + 2, match.group(2))
        for match in FENCE.finditer(README)
        if match.group(1) in languages
    ]


PYTHON = _blocks("python", "py")
SHELL = _blocks("bash", "sh", "shell")

RUNNER = """
import json, sys, time, traceback
results = {}
for line, code in json.load(open(sys.argv[1])):
    start = time.perf_counter()
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
        results[line] = {"ok": True, "seconds": time.perf_counter() - start}
    except BaseException:
        results[line] = {"ok": False, "error": traceback.format_exc()}
json.dump(results, open(sys.argv[2], "w"))
"""


def _run_blocks(blocks: list[tuple[int, str]], folder: Path, name: str, env: dict[str, str] | None) -> dict:
    (folder / f"{name}.json").write_text(json.dumps(blocks))
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, f"{name}.json", f"{name}_results.json"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(line): result for line, result in json.loads((folder / f"{name}_results.json").read_text()).items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory, fake_hub) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("readme")
    offline = [block for block in PYTHON if NEEDS_HUB not in block[1]]
    online = [block for block in PYTHON if NEEDS_HUB in block[1]]
    outcome = _run_blocks(offline, folder, "offline", {**fake_hub.env(), "HF_HUB_OFFLINE": "1"})
    outcome.update(_run_blocks(online, folder, "hub", fake_hub.env()))
    outcome["files"] = sorted(str(path.relative_to(folder)) for path in folder.iterdir())
    return outcome


@pytest.mark.parametrize("line", [line for line, _ in PYTHON], ids=lambda line: f"README.md:{line}")
def test_python_block_runs(results, line):
    result = results[line]
    assert result["ok"], result.get("error")


def test_blocks_write_only_into_outputs(results):
    assert PYTHON and set(results["files"]) <= {
        "outputs",
        *(f"{n}{s}.json" for n in ("offline", "hub") for s in ("", "_results")),
    }


def _recipe_fields() -> set[str]:
    sys.path.insert(0, str(ROOT / "recipes"))
    from recipe_kit.arguments import _field_names

    return _field_names()


def _cli_options() -> dict[str, set[str]]:
    from kron_transformers.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {name: {o for a in sub._actions for o in a.option_strings} for name, sub in subparsers.choices.items()}


def _extras() -> set[str]:
    return set(
        re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split("optional-dependencies]")[1], re.M)
    )


def _check_command(words: list[str]) -> None:
    options = [w.split("=")[0] for w in words if w.startswith("--")]
    if words[:2] == ["pip", "install"]:
        extras = re.findall(r"\.\[(\w+)\]", " ".join(words))
        assert set(extras) <= _extras(), extras
    elif words[0] == "kron-transformers":
        known = _cli_options()
        assert words[1] in known, words
        assert set(options) <= known[words[1]], options
    elif words[0] == "python" and words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, words[2]
    elif words[0] in ("python", "accelerate"):
        script = next(w for w in words if w.endswith(".py"))
        assert (ROOT / script).is_file(), script
        if script.startswith("recipes/"):
            assert {o[2:] for o in options} <= _recipe_fields(), options
        else:
            source = (ROOT / script).read_text()
            assert all(f'"{o}"' in source for o in options), options
    else:
        raise AssertionError(f"README shell command not checked: {' '.join(words)}")


@pytest.mark.parametrize(("line", "code"), SHELL, ids=[f"README.md:{line}" for line, _ in SHELL])
def test_shell_block_names_what_exists(line, code):
    text = code.replace("\\\n", " ")
    for command_line in text.splitlines():
        command_line = command_line.split(" #")[0].strip()
        if not command_line:
            continue
        for command in command_line.split("&&"):
            words = [w for w in shlex.split(command) if not w.startswith("[") and not w.endswith("]")]
            words = [w for w in words if w not in ("launch",) and not re.fullmatch(r"[A-Z_]+=\S+", w)]
            _check_command(words)


def test_inline_commands_name_existing_scripts():
    for script in re.findall(r"python ((?:benchmarks|recipes)/\w+\.py)", README):
        assert (ROOT / script).is_file(), script
