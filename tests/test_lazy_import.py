"""``import kron_transformers`` and ``kron-transformers --help`` load nothing heavy, yet ``from_pretrained`` of a
compressed checkpoint works once kron_transformers is imported (in either order with transformers)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_inputs

import kron_transformers as kt


PACKAGE = Path(kt.__file__).parent
HEAVY = ("torch", "transformers", "sklearn", "triton", "kron_transformers.kernels", "kron_transformers.integration")

LIGHT = f"""
import sys
import kron_transformers as kt
from kron_transformers.cli import build_parser
assert "kron-transformers" in build_parser().format_help()
assert "compress_model" in dir(kt) and kt.__version__
loaded = [name for name in {HEAVY!r} if name in sys.modules]
assert not loaded, loaded
"""

# argv: folder of a saved compressed GPT-2, file of its expected logits; IMPORT_FIRST decides the import order
LOAD = """
import os, sys
if os.environ["IMPORT_FIRST"] == "transformers":
    import transformers.modeling_utils
import kron_transformers
assert ("transformers.modeling_utils" in sys.modules) == (os.environ["IMPORT_FIRST"] == "transformers")
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
expected = load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert type(model.lm_head).__name__ == "TiedFactorizedHead", type(model.lm_head)
with torch.no_grad():
    torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=0)
"""


# transformers loads its model code from inside one of this package's imports, as it does when ``peft`` is
# installed (``kron_transformers.training`` imports ``TrainerCallback``, whose module imports peft, which imports
# transformers' models): the plugin still registers, once that import returns, and nothing is left half-imported
NESTED_TRIGGER = """
import importlib.abc, sys
import kron_transformers as kt

class LoadModelCodeFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "kron_transformers.training":
            sys.meta_path.remove(self)
            import transformers.modeling_utils  # while kron_transformers.modules and .cce are mid-import
        return None

sys.meta_path.insert(0, LoadModelCodeFirst())
from kron_transformers import KPDLinear
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
assert "transformers.modeling_utils" in sys.modules
assert AUTO_QUANTIZATION_CONFIG_MAPPING["kron"] is kt.KronConfig
assert KPDLinear.__name__ == "KPDLinear" and hasattr(sys.modules["kron_transformers.modules"], "COMPRESSED_MODULES")
"""

# with peft installed, each of these is the first thing a script imports
PEFT_FIRST_IMPORTS = (
    "from kron_transformers import KPDLinear",
    "import kron_transformers as kt; kt.KronTrainingCallback",
    "from kron_transformers.modules import KronLinear",
)
PEFT_CHECK = """
import sys
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
assert "peft" in sys.modules and "kron" in AUTO_QUANTIZATION_CONFIG_MAPPING
"""


def run(code: str, *args: str, **env: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def test_import_and_cli_help_load_nothing_heavy():
    run(LIGHT)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("gpt2-kron")
    model = kt.compress_model(build_model("gpt2"), kt.KronConfig(embedding=kt.Word2KetXS(rank=2)))
    model.save_pretrained(folder)
    input_ids = make_inputs("gpt2")["input_ids"]
    with torch.no_grad():
        save_file({"input_ids": input_ids, "logits": model(input_ids).logits}, str(folder / "expected.safetensors"))
    return folder


@pytest.mark.parametrize("first", ["kron_transformers", "transformers"])
def test_from_pretrained_after_import_in_either_order(saved_gpt2, first):
    run(LOAD, str(saved_gpt2), str(saved_gpt2 / "expected.safetensors"), IMPORT_FIRST=first)


def test_model_code_loaded_inside_an_import_of_this_package_registers_after_it():
    run(NESTED_TRIGGER)


@pytest.mark.parametrize("statement", PEFT_FIRST_IMPORTS)
def test_first_imports_with_peft_installed(statement):
    pytest.importorskip("peft")
    run(statement + "\n" + PEFT_CHECK)


def test_submodule_import_keeps_kt_report_and_distill_functions():
    import kron_transformers.distill
    import kron_transformers.report  # noqa: F401 (the import system sets the package attribute to the module)

    assert callable(kt.report) and callable(kt.distill)


def test_surgery_does_not_import_the_transformers_integration():
    tree = ast.parse((PACKAGE / "surgery.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if "integration" in name or "hf_quantizer" in name]
    # the integration registered itself: an in-memory compressed model carries the quantizer
    model = kt.compress_model(build_model("bert"), kt.KronConfig(attention=kt.LowRank(rank=4)))
    assert type(model.hf_quantizer).__name__ == "KronHfQuantizer"
    kt.decompress_model(model)
    assert not hasattr(model, "hf_quantizer") and not model.is_quantized
