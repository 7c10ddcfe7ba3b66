"""Tiny random models built from configs (no downloads) shared by the tests."""

from __future__ import annotations

import functools
import os

import torch


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # every Triton kernel runs interpreted on CPU CI
# the matmul path is chosen by deterministic counts, not by timing (factorizations/cost.py)
os.environ.setdefault("KRON_TRANSFORMERS_COST_MODEL", "count")

import pytest  # noqa: E402 (after TRITON_INTERPRET is set, before anything can import triton)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
)
from transformers.utils import logging as hf_logging


hf_logging.set_verbosity_error()
torch.set_num_threads(1)  # tiny tensors: a second thread only contends (einsums 8-24x slower, loaded)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the tests' subprocesses

# ``pytest -n 2 --dist loadgroup`` (the README's command) runs each file on one worker (module fixtures run
# once) and these files, which start 2-process DDP / FSDP runs, one after another on the same worker
MULTIPROCESS_FILES = {"test_recipes.py", "test_fsdp.py", "test_fsdp_translation_benchmark.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one pytest-xdist worker")


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "multiprocess" if item.path.name in MULTIPROCESS_FILES else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


# where the Triton kernel tests run the kernels: compiled on CUDA when there is a GPU, else interpreted on the CPU
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(item, device) for item in value)
    return value


def on_kernel_device(function):
    """``function`` with its tensor arguments (also inside lists) moved to ``KERNEL_DEVICE`` and its tensor result
    moved back to the CPU, both differentiably: a test builds its inputs and float64 references on the CPU and runs
    the same kernel on a GPU machine as on CI (where every move is a no-op)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        moved_kwargs = {name: _moved(value, KERNEL_DEVICE) for name, value in kwargs.items()}
        return _moved(function(*_moved(args, KERNEL_DEVICE), **moved_kwargs), torch.device("cpu"))

    return run


VOCAB = 99

# name -> (auto class, config kwargs, kind of inputs)
ARCHITECTURES = {
    "bert": (
        AutoModelForMaskedLM,
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB),
        "lm",
    ),
    "gpt2": (
        AutoModelForCausalLM,
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
        "lm",
    ),
    "t5": (
        AutoModelForSeq2SeqLM,
        dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0),
        "seq2seq",
    ),
    "bart": (
        AutoModelForSeq2SeqLM,
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=VOCAB,
            scale_embedding=True,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
        ),
        "seq2seq",
    ),
    "llama": (
        AutoModelForCausalLM,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "lm",
    ),
    "vit": (
        AutoModelForImageClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_labels=5,
        ),
        "image",
    ),
}


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    auto_class, kwargs, _ = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = auto_class.from_config(AutoConfig.for_model(name, **kwargs))
    # Randomize every parameter: zero-initialized biases and LayerNorms hide bugs.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
        for module in model.modules():  # nn.Embedding's padding row stays zero, as after its own init
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx] = 0
    return model.eval()


def make_inputs(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    kind = ARCHITECTURES[name][2]
    if kind == "image":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=generator), "labels": torch.tensor([0, 3, 4])}
    input_ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    if kind == "seq2seq":
        return {"input_ids": input_ids, "labels": torch.randint(3, VOCAB, (3, 5), generator=generator)}
    return {"input_ids": input_ids, "labels": input_ids.clone()}


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request) -> str:
    return request.param
