"""Bad input gets a clear message naming the module; shared configs and tied checkpoints behave."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, build_model, make_inputs
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForMaskedLM

import kron_transformers as kt
from kron_transformers import cli
from kron_transformers.factorizations import decompositions


QUERY = "bert.encoder.layer.0.attention.self.query"  # 32x32 in the tiny BERT


@pytest.mark.parametrize(
    ("spec", "advice"),
    [
        (kt.LowRank(rank=16), "rank <= 15 compresses"),  # 2 * 16 * 32 = 1024 = 32 * 32
        (kt.Shapeshifter(rank=16), "rank <= 15 compresses"),  # 16 * (4*8 + 8*4) = 1024
        (kt.PHM(n=16), "choose smaller sizes in the spec"),  # 16 * (16*16 + 2*2) = 4160
    ],
)
def test_a_spec_that_does_not_compress_warns_naming_module_and_useful_rank(spec, advice):
    expected = rf"{QUERY}: {spec.method} gives [\d,]+ parameters for the 32x32 weight \(1,024 dense\), so it does "
    with pytest.warns(UserWarning, match=expected + f"not compress; {advice}"):
        kt.compress_model(build_model("bert"), kt.KronConfig(attention=spec))


def test_a_spec_that_compresses_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kt.compress_model(build_model("bert"), kt.KronConfig(attention=kt.LowRank(rank=15)))


def test_a_non_finite_weight_is_named_and_the_model_left_untouched():
    model = build_model("bert")
    with torch.no_grad():
        model.get_submodule(QUERY).weight[3, 5] = float("nan")
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=rf"{QUERY}: its 32x32 weight holds 1 NaN/inf entries"):
        kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(rank=2), init="svd"))
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert kt.applied_config(model) is None


def test_a_recorded_structure_that_does_not_fit_names_the_module(tmp_path):
    kt.compress_model(build_model("bert"), kt.KronConfig(attention=kt.Shapeshifter(rank=2))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules"][QUERY]["structure"]["factor_shapes"] = [[3, 3], [3, 3]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{QUERY}: the recorded structure .* does not fit its 32x32 shape"):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


def test_two_models_from_one_config_object():
    auto_class, kwargs, _ = ARCHITECTURES["gpt2"]
    shared = AutoConfig.for_model("gpt2", **kwargs)
    first, second = auto_class.from_config(shared), auto_class.from_config(shared)
    kt.compress_model(first, kt.KronConfig(attention=kt.LowRank(rank=4)))
    assert not hasattr(shared, "quantization_config") and kt.applied_config(second) is None
    assert first.transformer.config is first.config is not shared  # submodels see the compressed model's copy
    assert not getattr(second, "is_quantized", False)
    kt.compress_model(second, kt.KronConfig(ffn=kt.LowRank(rank=4)))  # not "already compressed"
    assert set(kt.applied_config(second).modules).isdisjoint(kt.applied_config(first).modules)


def test_long_cp_als_logs_an_estimate_then_progress(monkeypatch, caplog):
    monkeypatch.setattr(decompositions, "SLOW_CP_SECONDS", 0.0)
    tensor = torch.randn(1, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger=decompositions.__name__):
        decompositions.cp_als(tensor, 3, iterations=3, tolerance=0.0)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("rank-3 CP-ALS of a 4x5x6 tensor (batch 1): up to 3 iterations, about ")
    assert [m.split(": ")[1].split(",")[0] for m in messages[1:]] == ["iteration 2/3", "iteration 3/3"]


def test_quick_cp_als_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger=decompositions.__name__):
        decompositions.cp_als(torch.randn(1, 4, 5, 6, dtype=torch.float64), 3, iterations=3)
    assert not caplog.records


@pytest.mark.parametrize(
    ("command", "relative"), [("compress", False), ("report", False), ("decompress", False), ("report", True)]
)
def test_cli_names_a_path_that_does_not_exist(command, relative, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = "./no-such-folder" if relative else str(tmp_path / "no" / "such" / "path")
    options = {"compress": ["--config", "c.json", "--output", "o"], "decompress": ["--output", "o"], "report": []}
    assert cli.main([command, missing, *options[command]]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kron-transformers {command}: error: {missing} does not exist (neither a local folder nor a Hub repo id "
        f"'name' or 'org/name')"
    )


def test_resuming_a_tied_compressed_checkpoint_reports_no_missing_keys(tmp_path):
    """Trainer re-ties (and stays quiet) when the missing keys are exactly ``_keys_to_ignore_on_save``."""
    model = kt.compress_model(build_model("gpt2"), kt.KronConfig(embedding=kt.Word2KetXS(rank=2)))
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    resumed = kt.compress_model(build_model("gpt2", seed=1), kt.KronConfig(embedding=kt.Word2KetXS(rank=2)))
    result = resumed.load_state_dict(state, strict=False)
    assert result.missing_keys and set(result.missing_keys) == set(resumed._keys_to_ignore_on_save)
    assert {key.split(".")[0] for key in result.missing_keys} == {"lm_head"} and not result.unexpected_keys
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(resumed(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    kt.decompress_model(resumed)
    assert not resumed._keys_to_ignore_on_save  # the dense model's own declaration again
