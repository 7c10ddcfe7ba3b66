"""Sharded compressed checkpoints and checkpoint-folder hygiene: stale layouts, failed saves, corrupt bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_inputs
from safetensors.torch import load_file, save_file
from test_hub import run_client
from test_surgery import METHODS
from transformers import AutoModelForMaskedLM

import kron_transformers as kt


pytest_plugins = ["fake_hub"]

TESTS = Path(__file__).parent
SHARD = "8KB"  # the tiny BERT (compressed) is ~90 KB: 4 shards


@pytest.fixture(scope="module")
def compressed():
    return kt.compress_model(build_model("bert"), METHODS["shapeshifter"]()).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs("bert")).logits


def _weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("model")}


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_sharded_round_trip(compressed, tmp_path):
    compressed.save_pretrained(tmp_path, max_shard_size=SHARD)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(_index(tmp_path)["weight_map"].values()) == set(shards)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == compressed.state_dict().keys()
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(_logits(loaded), _logits(compressed))


def _shard_of(folder: Path, fragment: str) -> tuple[Path, str]:
    name, shard = next((k, v) for k, v in _index(folder)["weight_map"].items() if fragment in k)
    return folder / shard, name


def test_validation_names_a_truncated_tensor_in_a_shard(compressed, tmp_path):
    compressed.save_pretrained(tmp_path, max_shard_size=SHARD)
    shard, _ = _shard_of(tmp_path, "layer.1.output.dense.factorization")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard.name}: tensor '.*' is truncated"):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


def test_validation_names_a_tensor_missing_from_a_shard(compressed, tmp_path):
    compressed.save_pretrained(tmp_path, max_shard_size=SHARD)
    shard, name = _shard_of(tmp_path, "layer.1.output.dense.factorization.factors.0")
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"lacks 1 compressed tensor.*layer\.1\.output\.dense\.factorization\.factors\.0"
    ):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


def test_validation_names_a_mismatched_tensor_in_a_shard(compressed, tmp_path):
    compressed.save_pretrained(tmp_path, max_shard_size=SHARD)
    shard, name = _shard_of(tmp_path, "layer.0.intermediate.dense.factorization.factors.1")
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(3, *tensors[name].shape[1:])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{shard.name}: tensor '{name}' has shape \(3, "):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(("first", "second"), [(None, SHARD), (SHARD, None), (SHARD, "10KB")])
def test_saving_over_another_layout_leaves_only_the_new_checkpoint(tmp_path, first, second):
    old = kt.compress_model(build_model("bert", seed=1), METHODS["shapeshifter"]())
    new = kt.compress_model(build_model("bert", seed=2), METHODS["shapeshifter"]()).eval()
    old.save_pretrained(tmp_path, **({"max_shard_size": first} if first else {}))
    new.save_pretrained(tmp_path, **({"max_shard_size": second} if second else {}))
    files = _weight_files(tmp_path)
    if second is None:
        assert files == {"model.safetensors"}
    else:
        assert files == {"model.safetensors.index.json", *_index(tmp_path)["weight_map"].values()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kron-save-")]
    assert torch.equal(_logits(AutoModelForMaskedLM.from_pretrained(tmp_path).eval()), _logits(new))


def test_a_folder_holding_both_layouts_is_refused(compressed, tmp_path):
    compressed.save_pretrained(tmp_path / "single")
    compressed.save_pretrained(tmp_path / "sharded", max_shard_size=SHARD)
    (tmp_path / "sharded" / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.index.json"):
        AutoModelForMaskedLM.from_pretrained(tmp_path / "sharded")


def test_a_failed_save_leaves_the_existing_checkpoint_intact(compressed, tmp_path, monkeypatch):
    compressed.save_pretrained(tmp_path, max_shard_size=SHARD)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    import transformers.modeling_utils as modeling_utils

    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", failing_save)
    other = kt.compress_model(build_model("bert", seed=3), METHODS["shapeshifter"]())
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path, max_shard_size="10KB")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(_logits(AutoModelForMaskedLM.from_pretrained(tmp_path).eval()), _logits(compressed))


def _corrupt_to_nan(folder: Path, fragment: str) -> str:
    """Overwrite the first float32 of the tensor whose name contains ``fragment`` with a NaN, in place."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    name = next(k for k in header if fragment in k)
    start = 8 + header_size + header[name]["data_offsets"][0]
    data[start : start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    return name


def test_non_finite_factor_bytes_fail_naming_the_tensor(compressed, tmp_path):
    compressed.save_pretrained(tmp_path)
    name = _corrupt_to_nan(tmp_path, "layer.0.attention.output.dense.factorization.factors.1")
    with pytest.raises(ValueError, match=rf"tensor '{name}' of the loaded checkpoint holds 1 non-finite"):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


def test_a_record_naming_an_absent_module_fails_naming_it_and_the_class(compressed, tmp_path):
    compressed.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    modules["bert.encoder.layer.7.attention.self.query"] = modules["bert.encoder.layer.0.attention.self.query"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.7\.attention\.self\.query', which BertForMaskedLM"):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


PUSH_AND_LOAD_SHARDED = """
import sys, torch
sys.path.insert(0, {tests!r})
import kron_transformers as kt
from conftest import build_model, make_inputs
from test_surgery import METHODS
from transformers import AutoModelForMaskedLM
model = kt.compress_model(build_model("bert"), METHODS["shapeshifter"]()).eval()
model.push_to_hub(sys.argv[1], max_shard_size="8KB")
loaded = AutoModelForMaskedLM.from_pretrained(sys.argv[1], cache_dir=sys.argv[2]).eval()
assert kt.applied_config(loaded) is not None
with torch.no_grad():
    assert torch.equal(loaded(**make_inputs("bert")).logits, model(**make_inputs("bert")).logits)
"""


def test_push_to_hub_of_a_sharded_model(fake_hub, tmp_path):
    run_client(fake_hub, PUSH_AND_LOAD_SHARDED.format(tests=str(TESTS)), "tester/bert-sharded", str(tmp_path))
    files = set(fake_hub.files("tester/bert-sharded"))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len([f for f in files if f.startswith("model-")]) > 2 and "README.md" in files
