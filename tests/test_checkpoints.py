"""save_pretrained / from_pretrained of compressed models through the "kron" quantizer plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, build_model, make_inputs
from safetensors.torch import load_file, save_file
from test_surgery import METHODS
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
from transformers.trainer_utils import validate_quantization_for_training

import kron_transformers as kt
from kron_transformers.integration.safetensors_check import validate_checkpoint_files


TESTS = Path(__file__).parent

# Runs in a fresh interpreter: loads every saved checkpoint and stores its outputs and state dict.
RELOAD_SCRIPT = """
import sys, json, torch
sys.path.insert(0, {tests!r})
import kron_transformers as kt
from safetensors.torch import load_file, save_file
from conftest import ARCHITECTURES
from transformers.utils import logging
logging.disable_progress_bar()
for case in json.loads(sys.argv[1]):
    folder = sys.argv[2] + "/" + case
    arch = case.split("-")[0]
    model = ARCHITECTURES[arch][0].from_pretrained(folder).eval()
    inputs = load_file(folder + "/inputs.safetensors")
    with torch.no_grad():
        logits = model(**inputs).logits
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    shared = getattr(head, "factorization", None)
    tied = shared is not None and shared is getattr(embedding, "factorization", None)
    state = {{k: v.clone().contiguous() for k, v in model.state_dict().items()}}  # tied entries as copies
    save_file(state, folder + "/reloaded_state.safetensors")
    save_file({{"logits": logits}}, folder + "/reloaded_logits.safetensors")
    json.dump({{"tied": tied, "quantizer": type(model.hf_quantizer).__name__}}, open(folder + "/reloaded.json", "w"))
"""

CASES = [f"{arch}-{method}" for arch in sorted(ARCHITECTURES) for method in sorted(METHODS)]


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Compress and save every method x architecture, then reload them all in one fresh process."""
    root = tmp_path_factory.mktemp("checkpoints")
    for case in CASES:
        arch, method = case.split("-")
        model = build_model(arch)
        kt.compress_model(model, METHODS[method]())
        inputs = make_inputs(arch)
        with torch.no_grad():
            logits = model(**inputs).logits
        folder = root / case
        model.save_pretrained(folder)
        save_file(inputs, str(folder / "inputs.safetensors"))
        save_file({"logits": logits}, str(folder / "logits.safetensors"))
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "state.safetensors"))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        (folder / "tied.json").write_text(json.dumps(isinstance(head, kt.TiedFactorizedHead)))
    script = RELOAD_SCRIPT.format(tests=str(TESTS))
    subprocess.run([sys.executable, "-c", script, json.dumps(CASES), str(root)], check=True, env=_clean_env())
    return root


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("case", CASES)
def test_round_trip_in_a_fresh_process(reloaded, case):
    folder = reloaded / case
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    saved_config = json.loads((folder / "config.json").read_text())
    assert saved_config["quantization_config"]["quant_method"] == "kron"
    assert saved_config["quantization_config"]["modules"]
    expected_state = load_file(str(folder / "state.safetensors"))
    reloaded_state = load_file(str(folder / "reloaded_state.safetensors"))
    assert expected_state.keys() == reloaded_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(value, reloaded_state[key]), key
    expected = load_file(str(folder / "logits.safetensors"))["logits"]
    assert torch.equal(load_file(str(folder / "reloaded_logits.safetensors"))["logits"], expected)
    info = json.loads((folder / "reloaded.json").read_text())
    assert info["quantizer"] == "KronHfQuantizer"
    assert info["tied"] == json.loads((folder / "tied.json").read_text())


@pytest.mark.parametrize("architecture", ["bert", "gpt2", "t5"])
def test_compress_while_loading_equals_compress_model(tmp_path, architecture):
    dense = build_model(architecture)
    dense.save_pretrained(tmp_path)
    config = METHODS["word2ketxs_kpd"]()
    loaded = ARCHITECTURES[architecture][0].from_pretrained(tmp_path, quantization_config=config).eval()
    expected = kt.compress_model(build_model(architecture), METHODS["word2ketxs_kpd"]())
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    assert loaded.config.quantization_config.modules == expected.config.quantization_config.modules
    inputs = make_inputs(architecture)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected(**inputs).logits, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "compressed")
    again = ARCHITECTURES[architecture][0].from_pretrained(tmp_path / "compressed").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, expected(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reload(tmp_path, dtype):
    model = kt.compress_model(build_model("llama"), METHODS["word2ketxs_kpd"]())
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=dtype)
    factors = [p for m in loaded.modules() if isinstance(m, kt.FactorizedLinear) for p in m.parameters()]
    factors += list(loaded.get_input_embeddings().factorization.parameters())
    assert factors and all(p.dtype == dtype for p in factors)
    inputs = {"input_ids": make_inputs("llama")["input_ids"]}
    with torch.no_grad():
        reference = model.model(**inputs).last_hidden_state
        torch.testing.assert_close(loaded(**inputs).last_hidden_state.float(), reference, rtol=0.05, atol=0.05)


def test_head_checkpoint_into_base_model_and_back(tmp_path):
    model = kt.compress_model(build_model("bert"), METHODS["shapeshifter"]())
    model.save_pretrained(tmp_path / "mlm")
    base = AutoModel.from_pretrained(tmp_path / "mlm").eval()
    assert isinstance(base.encoder.layer[0].attention.self.query, kt.KronLinear)
    assert "encoder.layer.0.attention.self.query" in base.config.quantization_config.modules
    inputs = {"input_ids": make_inputs("bert")["input_ids"]}
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    head = AutoModelForMaskedLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        torch.testing.assert_close(head.bert(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state)


def test_decompressed_checkpoint_loads_without_the_plugin(tmp_path):
    model = kt.compress_model(build_model("gpt2"), METHODS["word2ketxs_kpd"]())
    kt.decompress_model(model)
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        save_file(
            {"logits": model(**inputs).logits, "input_ids": inputs["input_ids"]},
            str(tmp_path / "expected.safetensors"),
        )
    script = (
        "import sys, torch; from safetensors.torch import load_file; from transformers import AutoModelForCausalLM\n"
        "assert 'kron_transformers' not in sys.modules\n"
        f"data = load_file({str(tmp_path / 'expected.safetensors')!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
        "assert 'kron_transformers' not in sys.modules\n"
        "with torch.no_grad(): logits = model(input_ids=data['input_ids']).logits\n"
        "assert torch.equal(logits, data['logits']), (logits - data['logits']).abs().max()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=_clean_env())


def _saved(tmp_path: Path) -> Path:
    model = kt.compress_model(build_model("bert"), METHODS["shapeshifter"]())
    model.save_pretrained(tmp_path)
    return tmp_path


def test_truncated_checkpoint_fails_naming_the_tensor(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"tensor '.*' is truncated"):
        AutoModelForMaskedLM.from_pretrained(folder)


def test_checkpoint_disagreeing_with_its_config_fails_naming_the_tensor(tmp_path):
    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    entry = config["quantization_config"]["modules"]["bert.encoder.layer.0.attention.self.query"]
    entry["structure"]["rank"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"attention\.self\.query\.factorization\.factors\.0' has shape \(2, "):
        AutoModelForMaskedLM.from_pretrained(folder)


def test_pickle_checkpoints_are_refused(tmp_path):
    model = kt.compress_model(build_model("bert"), METHODS["shapeshifter"]())
    with pytest.raises(ValueError, match="safetensors only"):
        validate_checkpoint_files(model, [str(tmp_path / "pytorch_model.bin")])


def test_kt_from_pretrained_loads_the_recorded_architecture_and_refuses_dense(tmp_path):
    folder = _saved(tmp_path / "compressed")
    loaded = kt.from_pretrained(folder)
    assert type(loaded).__name__ == "BertForMaskedLM" and kt.applied_config(loaded) is not None
    build_model("bert").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="is not a kron_transformers checkpoint"):
        kt.from_pretrained(tmp_path / "dense")
    compressed = kt.from_pretrained(tmp_path / "dense", quantization_config=METHODS["shapeshifter"]())
    assert kt.applied_config(compressed) is not None


def test_trainer_guard_accepts_compressed_models(tmp_path):
    model = kt.compress_model(build_model("bert"), METHODS["shapeshifter"]())
    assert model.is_quantized and model.quantization_method == "kron"
    validate_quantization_for_training(model)
    model.save_pretrained(tmp_path)
    validate_quantization_for_training(AutoModelForMaskedLM.from_pretrained(tmp_path))


def test_saved_config_records_the_resolved_structure(tmp_path):
    folder = _saved(tmp_path)
    config = AutoConfig.from_pretrained(folder)
    modules = (
        config.quantization_config["modules"]
        if isinstance(config.quantization_config, dict)
        else (config.quantization_config.modules)
    )
    assert modules["bert.encoder.layer.0.attention.self.query"]["structure"]["factor_shapes"] == [[4, 8], [8, 4]]


def test_transformers_dequantize_is_decompress():
    model = kt.compress_model(build_model("bert"), METHODS["shapeshifter"]())
    inputs = make_inputs("bert")
    with torch.no_grad():
        compressed = model(**inputs).logits
        dense = model.dequantize()
        torch.testing.assert_close(dense(**inputs).logits, compressed, rtol=1e-5, atol=1e-5)
    assert isinstance(dense.bert.encoder.layer[0].attention.self.query, torch.nn.Linear)
    assert not dense.is_quantized and not hasattr(dense.config, "quantization_config")
