"""``kt.compress_pretrained(init="calibrated")``: block-by-block calibration straight from the checkpoint's shards.

Bit-for-bit comparisons fix the number of ALS sweeps (``calibration_time_ratio=None``): by default the
weighted Kronecker solver stops on a wall-clock budget, so two runs may refine a layer for different numbers
of sweeps.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import weakref

import pytest
import torch
from conftest import ARCHITECTURES, build_model, make_inputs
from safetensors.torch import load_file, save_file

import kron_transformers as kt
from kron_transformers.factorizations import build_factorization
from kron_transformers.factorizations.weighted import weighted_error
from kron_transformers.integration import layerwise
from kron_transformers.reconstruct import find_blocks
from kron_transformers.surgery import (
    KIND_EMBEDDING,
    KIND_TIED_HEAD,
    _build,
    _wrap,
    build_order,
    plan_compression,
    set_module,
    swap_in,
)


FIXED_SWEEPS = dict(calibration_time_ratio=None)  # the full ALS sweep budget, not a wall-clock one


def blocks_only() -> kt.KronConfig:
    return kt.KronConfig(
        attention=kt.Shapeshifter(rank=2), ffn=kt.KPD(rank=2, block_size=(2, 2)), init="calibrated", **FIXED_SWEEPS
    )


def with_embedding() -> kt.KronConfig:
    return kt.KronConfig(
        embedding=kt.LowRank(rank=4),
        attention=kt.Shapeshifter(rank=2),
        ffn=kt.LowRank(rank=3),
        init="calibrated",
        **FIXED_SWEEPS,
    )


def untied_dense_head() -> kt.KronConfig:
    return dataclasses.replace(with_embedding(), untie_lm_head=True)


def untied_head_with_its_own_spec() -> kt.KronConfig:
    return dataclasses.replace(with_embedding(), lm_head=kt.LowRank(rank=3), untie_lm_head=True)


def low_rank() -> kt.KronConfig:
    return kt.KronConfig(attention=kt.LowRank(rank=3), ffn=kt.LowRank(rank=3), init="calibrated", **FIXED_SWEEPS)


def batches(architecture: str) -> list[dict[str, torch.Tensor]]:
    return [make_inputs(architecture, seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Sharded dense checkpoints of the tiny models (several tensors per shard, blocks across shards)."""
    folders = {}
    for architecture in ("llama", "bert", "gpt2", "t5", "bart"):
        folder = tmp_path_factory.mktemp(f"dense-{architecture}")
        model = build_model(architecture)
        if architecture == "bart":  # a persistent buffer, read from the checkpoint (zeros when built)
            model.final_logits_bias.normal_()
        model.save_pretrained(folder, max_shard_size="20KB")
        assert len(list(folder.glob("model-*.safetensors"))) > 1
        folders[architecture] = folder
    return folders


def sequential_reference(folder, architecture: str, config: kt.KronConfig, data: list[dict]):
    """The procedure in memory: the whole dense model loaded, then unit by unit (embedding, blocks in order, the
    rest) ``kt.calibrate`` on the model whose earlier units are compressed, and ``compress_model``'s build.

    Returns the model and, per compressed layer, the second moment ``C`` it was calibrated with.
    """
    model = ARCHITECTURES[architecture][0].from_pretrained(folder).eval()
    order = build_order(plan_compression(model, config))
    blocks = find_blocks(model)

    def unit(plan) -> str:
        return next((block for block in blocks if plan.info.name.startswith(block + ".")), plan.info.name)

    built = [plan for plan in order if plan.kind != KIND_TIED_HEAD]
    units = sorted(
        {unit(p) for p in built},
        key=lambda u: (
            u not in [unit(p) for p in built if p.kind == "embedding"],
            blocks.index(u) if u in blocks else len(blocks),
        ),
    )
    embeddings, moments = {}, {}
    for name in units:
        stats = kt.calibrate(model, data)
        for plan in [p for p in built if unit(p) == name]:
            _build(plan, "calibrated", embeddings, stats, time_ratio=None)
            moments[plan.info.name] = stats.second_moment(plan.info.name)
            done = [
                plan,
                *[p for p in order if p.kind == KIND_TIED_HEAD and p.info.module.weight is plan.info.module.weight],
            ]
            for item in done[1:]:
                _wrap(item, None, embeddings)
            for item in done:
                infos = item.group if item.kind == KIND_EMBEDDING else [item.info]
                for info, replacement in zip(infos, item.replacements):
                    for path in info.names:
                        set_module(model, path, replacement)
    swap_in(model, config, order)
    return model, moments


def assert_identical(streamed, expected, architecture: str) -> None:
    state, reference = streamed.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert streamed.config.quantization_config.modules == expected.config.quantization_config.modules
    inputs = make_inputs(architecture, seed=7)
    with torch.no_grad():
        assert torch.equal(streamed(**inputs).logits, expected(**inputs).logits)


@pytest.mark.parametrize(
    ("architecture", "config"),
    [
        ("llama", blocks_only),
        ("llama", with_embedding),
        ("bert", blocks_only),
        ("gpt2", with_embedding),
        ("gpt2", untied_dense_head),
        ("llama", untied_head_with_its_own_spec),
        ("t5", low_rank),
        ("bart", low_rank),
    ],
)
def test_streamed_equals_the_sequential_procedure_in_memory_bit_for_bit(checkpoints, architecture, config):
    data = batches(architecture)
    streamed = kt.compress_pretrained(checkpoints[architecture], config(), data)
    expected, _ = sequential_reference(checkpoints[architecture], architecture, config(), data)
    assert_identical(streamed, expected, architecture)
    records = streamed.config.quantization_config.modules
    assert {record.get("init") for record in records.values()} - {None} <= {
        "calibrated",
        "calibrated (token frequency)",
    }


def test_the_first_block_equals_compress_model_and_later_blocks_see_compressed_inputs(checkpoints):
    data = batches("llama")
    streamed = kt.compress_pretrained(checkpoints["llama"], blocks_only(), data)
    dense = ARCHITECTURES["llama"][0].from_pretrained(checkpoints["llama"]).eval()
    one_shot = kt.compress_model(dense, blocks_only(), calibration_data=data)  # C of the dense model throughout
    state, reference = streamed.state_dict(), one_shot.state_dict()
    first = [key for key in reference if key.startswith("model.layers.0.") and ".factorization." in key]
    last = [key for key in reference if key.startswith("model.layers.1.") and ".factorization." in key]
    assert first and all(torch.equal(state[key], reference[key]) for key in first)
    assert not all(torch.equal(state[key], reference[key]) for key in last)


def test_each_layer_is_no_worse_than_svd_under_its_own_second_moment(checkpoints):
    data = batches("llama")
    streamed = kt.compress_pretrained(checkpoints["llama"], with_embedding(), data)
    dense = ARCHITECTURES["llama"][0].from_pretrained(checkpoints["llama"]).eval()
    _, moments = sequential_reference(checkpoints["llama"], "llama", with_embedding(), data)
    records = streamed.config.quantization_config.modules
    linears = [name for name, record in records.items() if record["kind"] == "linear"]
    assert len(linears) == 14
    for name in linears:
        weight = dense.get_submodule(name).weight.detach()
        svd = build_factorization(records[name]["structure"], *weight.shape)
        svd.fit(weight)
        calibrated = streamed.get_submodule(name).materialize().detach()
        moment = moments[name]
        assert records[name]["output_error"] == pytest.approx(weighted_error(weight, calibrated, moment), rel=1e-9)
        assert weighted_error(weight, calibrated, moment) <= weighted_error(weight, svd.materialize(), moment) + 1e-12


def test_at_most_one_blocks_dense_weights_are_alive_at_any_time(checkpoints, monkeypatch):
    """Every dense tensor read is tracked by a weak reference; whenever a unit is read, the targeted dense
    weights of every other block have been freed (garbage collected, not just swapped out)."""
    alive: dict[str, weakref.ref] = {}
    seen_alive: list[set[str]] = []
    original = layerwise.LayerwiseCalibration._load

    def load(self, parameter_ids):
        gc.collect()
        seen_alive.append({name for name, ref in alive.items() if ref() is not None})
        original(self, parameter_ids)
        for names, holders in self.owners.values():
            parameter = getattr(holders[0][0], holders[0][1])
            if not parameter.is_meta and names[0] not in alive:
                alive[names[0]] = weakref.ref(parameter)

    monkeypatch.setattr(layerwise.LayerwiseCalibration, "_load", load)
    checkpoint_reads = []
    original_read = layerwise._Checkpoint.load

    def read(self, keys):
        if keys:  # the first call reads the persistent buffers: Llama stores none
            checkpoint_reads.append(list(keys))
        return original_read(self, keys)

    monkeypatch.setattr(layerwise._Checkpoint, "load", read)
    model = kt.compress_pretrained(checkpoints["llama"], low_rank(), batches("llama"))
    gc.collect()
    targeted = [name for name, record in model.config.quantization_config.modules.items()]
    dense_targeted = {f"{name}.weight" for name in targeted}

    def blocks_of(names: set[str]) -> set[str]:
        return {".".join(name.split(".")[:3]) for name in names & dense_targeted}

    # reads: what stays dense first (embeddings, norms), then one block at a time
    assert [blocks_of(set(keys)) for keys in checkpoint_reads] == [set(), {"model.layers.0"}, {"model.layers.1"}]
    assert seen_alive[0] == set() and blocks_of(seen_alive[1]) == set() and blocks_of(seen_alive[2]) == set()
    assert not dense_targeted & {name for name, ref in alive.items() if ref() is not None}
    every = [key for keys in checkpoint_reads for key in keys]
    stored = json.loads((checkpoints["llama"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(every) == sorted(stored)  # each tensor read exactly once


def test_each_layers_second_moment_is_freed_once_the_layer_is_built(checkpoints, monkeypatch):
    """Peak memory holds the ``C`` sums of the layers of one block not yet built: a layer's are dropped as soon as
    its ``C`` is converted for the solve."""
    held: list[tuple[str, set[str]]] = []
    original = layerwise._build

    def build(plan, init, built_embeddings, stats, **options):
        held.append((plan.info.name, set(stats.second_moments)))
        original(plan, init, built_embeddings, stats, **options)
        assert plan.info.name not in stats.second_moments

    monkeypatch.setattr(layerwise, "_build", build)
    kt.compress_pretrained(checkpoints["llama"], low_rank(), batches("llama"))
    assert len(held) == 14  # 7 linears in each of 2 blocks
    for index, (name, names) in enumerate(held):
        block = name.rsplit(".", 2)[0]
        later = {n for n, _ in held[index:] if n.startswith(block + ".")}
        assert names == later, name


def test_the_result_saves_sharded_and_reloads_like_any_compressed_model(checkpoints, tmp_path):
    model = kt.compress_pretrained(checkpoints["llama"], with_embedding(), batches("llama"))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    reloaded = kt.from_pretrained(tmp_path).eval()
    assert_identical(reloaded, model, "llama")
    assert isinstance(reloaded.lm_head, kt.TiedFactorizedHead)
    assert reloaded.lm_head.factorization is reloaded.model.embed_tokens.factorization


def test_svd_init_is_compress_while_loading(checkpoints):
    config = kt.KronConfig(attention=kt.Shapeshifter(rank=2), ffn=kt.Shapeshifter(rank=2), init="svd")
    streamed = kt.compress_pretrained(checkpoints["llama"], config)
    expected = ARCHITECTURES["llama"][0].from_pretrained(checkpoints["llama"], quantization_config=config).eval()
    assert_identical(streamed, expected, "llama")


def test_bad_inputs_raise_clear_errors(checkpoints, tmp_path):
    folder, data = checkpoints["llama"], batches("llama")
    with pytest.raises(ValueError, match="needs calibration_data="):
        kt.compress_pretrained(folder, blocks_only())
    with pytest.raises(ValueError, match="calibration_data is empty"):
        kt.compress_pretrained(folder, blocks_only(), [])
    with pytest.raises(TypeError, match="must be a dict of model inputs, got Tensor"):
        kt.compress_pretrained(folder, blocks_only(), [data[0]["input_ids"]])
    with pytest.raises(ValueError, match="init='calibrated' only"):
        kt.compress_pretrained(folder, kt.KronConfig(ffn=kt.LowRank(rank=2)), data)
    with pytest.raises(TypeError, match="must be a kron_transformers.KronConfig"):
        kt.compress_pretrained(folder, {"ffn": "lowrank"}, data)
    with pytest.raises(ValueError, match="found no transformer blocks in LlamaForCausalLM"):
        kt.compress_pretrained(folder, blocks_only(), data, blocks=[])
    with pytest.raises(ValueError, match="has no module 'model.blocks.0'"):
        kt.compress_pretrained(folder, blocks_only(), data, blocks=["model.blocks.0"])
    with pytest.raises(ValueError, match="matches the config"):
        kt.compress_pretrained(folder, kt.KronConfig(rules={"nothing": kt.LowRank(rank=2)}, init="calibrated"), data)
    empty = tmp_path / "config-only"
    empty.mkdir()
    shutil.copy(folder / "config.json", empty / "config.json")
    with pytest.raises(ValueError, match="neither model.safetensors.index.json nor model.safetensors"):
        kt.compress_pretrained(empty, blocks_only(), data)
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    index = json.loads((truncated / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    shard = truncated / index["weight_map"].pop(key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (truncated / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"checkpoint lacks model\.layers\.1\.mlp\.down_proj\.weight \(shape \(32, 64\)\)"
    ):
        kt.compress_pretrained(truncated, blocks_only(), data)
    mixed = [data[0], {"inputs_embeds": torch.randn(3, 7, 32)}]
    with pytest.raises(ValueError, match="different paths through the model"):
        kt.compress_pretrained(folder, with_embedding(), mixed)


def test_a_block_the_calibration_data_never_reaches_gets_the_svd_init(checkpoints, monkeypatch):
    skeleton = layerwise._skeleton

    def one_layer_forward(*args, **kwargs):
        model = skeleton(*args, **kwargs)
        model.config.num_hidden_layers = 1  # LlamaModel.forward runs layers[:num_hidden_layers]
        return model

    monkeypatch.setattr(layerwise, "_skeleton", one_layer_forward)
    model = kt.compress_pretrained(checkpoints["llama"], low_rank(), batches("llama"))
    records = model.config.quantization_config.modules
    assert records["model.layers.0.mlp.up_proj"]["init"] == "calibrated"
    assert records["model.layers.1.mlp.up_proj"]["init"] == "svd (no calibration input reached this module)"
    dense = ARCHITECTURES["llama"][0].from_pretrained(checkpoints["llama"])
    svd = kt.compress_model(dense, dataclasses.replace(low_rank(), init="svd"))
    assert torch.equal(model.model.layers[1].mlp.up_proj.materialize(), svd.model.layers[1].mlp.up_proj.materialize())
