"""Compress while loading (``from_pretrained(dense, quantization_config=...)``) equals load-then-compress exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ARCHITECTURES, build_model, make_inputs
from safetensors.torch import load_file, save_file
from test_surgery import METHODS, UNTIED_HEADS

import kron_transformers as kt
from kron_transformers.integration import streaming
from kron_transformers.integration.hf_quantizer import KERNELS_DEVICE


def _load_then_compress(folder, architecture: str, config: kt.KronConfig, seed: int = 0):
    model = ARCHITECTURES[architecture][0].from_pretrained(folder).eval()
    torch.manual_seed(seed)
    return kt.compress_model(model, config)


def _streamed(folder, architecture: str, config: kt.KronConfig, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHITECTURES[architecture][0].from_pretrained(folder, quantization_config=config).eval()


def _assert_identical(streamed, expected, architecture: str) -> None:
    streamed_state, expected_state = streamed.state_dict(), expected.state_dict()
    assert streamed_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert streamed_state[key].dtype == value.dtype and torch.equal(streamed_state[key], value), key
    assert streamed.config.quantization_config.modules == expected.config.quantization_config.modules
    inputs = make_inputs(architecture)
    with torch.no_grad():
        assert torch.equal(streamed(**inputs).logits, expected(**inputs).logits)
    assert [type(m) for m in streamed.modules()] == [type(m) for m in expected.modules()]


CASES = [(method, init) for method in sorted(METHODS) for init in ("svd", "random")]


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense-llama")
    build_model("llama").save_pretrained(folder, max_shard_size="20KB")  # several shards
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return folder


@pytest.mark.parametrize(("method", "init"), CASES)
def test_streaming_equals_load_then_compress_for_every_method(dense_llama, method, init):
    config = dataclasses.replace(METHODS[method](), init=init)
    streamed = _streamed(dense_llama, "llama", config)
    expected = _load_then_compress(dense_llama, "llama", dataclasses.replace(METHODS[method](), init=init))
    _assert_identical(streamed, expected, "llama")
    assert isinstance(streamed.lm_head, kt.TiedFactorizedHead)
    assert streamed.lm_head.factorization is streamed.model.embed_tokens.factorization


@pytest.mark.parametrize("architecture", ["bert", "gpt2", "t5"])
def test_streaming_equals_load_then_compress_across_architectures(tmp_path, architecture):
    build_model(architecture).save_pretrained(tmp_path)
    streamed = _streamed(tmp_path, architecture, METHODS["word2ketxs_kpd"]())
    _assert_identical(streamed, _load_then_compress(tmp_path, architecture, METHODS["word2ketxs_kpd"]()), architecture)
    # transformers >= 5.25 kernelizes on the CPU the load names while the dense shells are meta; the name must not
    # outlive the load (a later kernelize, after .to(device), would map the kernels of the wrong device)
    assert not hasattr(streamed, KERNELS_DEVICE)
    assert not any(parameter.is_meta for parameter in streamed.parameters())


@pytest.mark.parametrize("case", sorted(UNTIED_HEADS))
@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_an_untied_head_takes_the_embeddings_tensor_from_the_tied_checkpoint(tmp_path, architecture, case):
    build_model(architecture).save_pretrained(tmp_path)
    assert not any("lm_head" in key for key in load_file(tmp_path / "model.safetensors"))  # one tensor for both
    streamed = _streamed(tmp_path, architecture, UNTIED_HEADS[case]())
    _assert_identical(streamed, _load_then_compress(tmp_path, architecture, UNTIED_HEADS[case]()), architecture)
    assert not any(parameter.is_meta for parameter in streamed.parameters())


def test_each_dense_tensor_is_factorized_as_it_is_read_and_not_kept(dense_llama, monkeypatch):
    consumed = []
    original = streaming.StreamingCompression.consume

    def consume(self, name, tensor):
        consumed.append(name)
        return original(self, name, tensor)

    monkeypatch.setattr(streaming.StreamingCompression, "consume", consume)
    model = _streamed(dense_llama, "llama", METHODS["shapeshifter"]())
    targeted = [
        name for name, m in model.named_modules() if isinstance(m, (kt.FactorizedLinear, kt.FactorizedEmbedding))
    ]
    assert sorted(consumed) == sorted(f"{name}.weight" for name in targeted)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())  # no dense shell left


def test_calibrated_init_is_refused_before_any_weight_is_read(dense_llama):
    config = dataclasses.replace(METHODS["shapeshifter"](), init="calibrated")
    with pytest.raises(ValueError, match="compress_model\\(model, config, calibration_data"):
        _streamed(dense_llama, "llama", config)


def test_a_checkpoint_lacking_a_targeted_weight_fails_naming_it(tmp_path):
    build_model("bert").save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weight.*encoder\.layer\.1\.output\.dense\.weight"):
        _streamed(tmp_path, "bert", METHODS["shapeshifter"]())


def test_mapped_checkpoint_pages_are_released(tmp_path):
    build_model("bert").save_pretrained(tmp_path)
    from safetensors import safe_open

    path = str(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)
        streaming.release_mapped_pages([path])  # must not disturb later reads of the mapping
        streaming.release_freed_heap()
        again = {key: handle.get_tensor(key) for key in handle.keys()}
    expected = load_file(path)
    assert all(torch.equal(again[key], value) for key, value in expected.items())


def test_the_freed_heap_is_returned_after_every_consumed_tensor(dense_llama, monkeypatch):
    calls = {"consumed": 0, "released": 0}
    original = streaming.StreamingCompression.consume

    def consume(self, name, tensor):
        calls["consumed"] += 1
        return original(self, name, tensor)

    def release() -> None:
        calls["released"] += 1

    monkeypatch.setattr(streaming.StreamingCompression, "consume", consume)
    monkeypatch.setattr(streaming, "release_freed_heap", release)
    _streamed(dense_llama, "llama", METHODS["shapeshifter"]())
    assert calls["released"] == calls["consumed"] > 0
