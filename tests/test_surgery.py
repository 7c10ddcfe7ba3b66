"""compress_model / decompress_model over methods x architectures (table-driven, PEFT style)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, build_model, make_inputs
from torch import nn

import kron_transformers as kt
from kron_transformers.factorizations import max_kronecker_rank
from kron_transformers.modules import CONV1D_LAYOUT, FactorizedEmbedding, FactorizedLinear, TiedFactorizedHead


TEXT_ARCHITECTURES = sorted(name for name, (_, _, kind) in ARCHITECTURES.items() if kind != "image")

METHODS = {
    "shapeshifter": lambda: kt.KronConfig(
        embedding=kt.Shapeshifter(rank=4), attention=kt.Shapeshifter(rank=2), ffn=kt.Shapeshifter(rank=2)
    ),
    "word2ketxs_kpd": lambda: kt.KronConfig(
        embedding=kt.Word2KetXS(rank=4), attention=kt.Shapeshifter(rank=2), ffn=kt.KPD(rank=2, block_size=(2, 2))
    ),
    "word2ket_phm": lambda: kt.KronConfig(embedding=kt.Word2Ket(rank=2), attention=kt.PHM(n=4), ffn=kt.PHM(n=2)),
    "kronecker_order3": lambda: kt.KronConfig(
        embedding=kt.Word2KetXS(order=3, rank=2),
        attention=kt.Kronecker(order=3, rank=2),
        ffn=kt.Kronecker(order=3, rank=2),
    ),
    "low_rank": lambda: kt.KronConfig(
        embedding=kt.LowRank(rank=4), attention=kt.LowRank(rank=4), ffn=kt.LowRank(rank=4)
    ),
}


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def snapshot(model: nn.Module) -> tuple[dict, list]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, type(module)) for name, module in model.named_modules()],
    )


def assert_unchanged(model: nn.Module, before: tuple[dict, list]) -> None:
    state, structure = before
    assert [(name, type(module)) for name, module in model.named_modules()] == structure
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert kt.applied_config(model) is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compress_runs_and_decompress_is_exact(architecture, method):
    model = build_model(architecture)
    inputs = make_inputs(architecture)
    kt.compress_model(model, METHODS[method]())

    roles = {row.role for row in kt.report(model).modules}
    expected_roles = {"attention", "ffn"} | ({"embedding"} if architecture in TEXT_ARCHITECTURES else set())
    assert roles == expected_roles
    model.train()
    loss = model(**inputs).loss
    loss.backward()
    factor_grads = [
        p.grad for m in model.modules() if isinstance(m, FactorizedLinear) for p in m.factorization.parameters()
    ]
    assert factor_grads and all(g is not None and torch.isfinite(g).all() for g in factor_grads)
    assert any(g.abs().sum() > 0 for g in factor_grads)

    model.eval()
    compressed = logits(model, inputs)
    kt.decompress_model(model)
    assert not any(isinstance(m, (FactorizedLinear, FactorizedEmbedding, TiedFactorizedHead)) for m in model.modules())
    torch.testing.assert_close(logits(model, inputs), compressed, rtol=1e-5, atol=1e-5)
    assert kt.applied_config(model) is None


def test_training_steps_lower_the_loss(architecture):
    model = build_model(architecture)
    inputs = make_inputs(architecture)
    config = kt.KronConfig(
        embedding=kt.Word2KetXS(rank=4),
        attention=kt.Shapeshifter(rank=2),
        ffn=kt.KPD(rank=2, block_size=(2, 2)),
        init="random",
    )
    kt.compress_model(model, config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def full_rank_rules(model: nn.Module) -> dict[str, kt.MethodSpec]:
    """One rule per linear: a Shapeshifter rank that represents its weight exactly."""
    from kron_transformers.factorizations import balanced_factor_shapes
    from kron_transformers.roles import is_linear

    rules = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if is_linear(module) and module is not head:
            rows, cols = module.weight.shape if isinstance(module, nn.Linear) else module.weight.T.shape
            rank = max_kronecker_rank(balanced_factor_shapes(rows, cols, 2))
            rules[rf"{name}"] = kt.Shapeshifter(rank=rank)
    return rules


def test_full_rank_svd_init_reproduces_the_model(architecture):
    model = build_model(architecture)
    inputs = make_inputs(architecture)
    reference = logits(model, inputs)
    kt.compress_model(model, kt.KronConfig(rules=full_rank_rules(model), init="svd"))
    errors = [row.init_error for row in kt.report(model).modules]
    assert errors and max(errors) < 1e-5
    torch.testing.assert_close(logits(model, inputs), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", TEXT_ARCHITECTURES)
def test_tied_head_stays_tied(architecture):
    model = build_model(architecture)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    kt.compress_model(model, kt.KronConfig(embedding=kt.Word2KetXS(rank=4)))
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, TiedFactorizedHead) and isinstance(embedding, FactorizedEmbedding)
    assert head.factorization is embedding.factorization
    model.tie_weights()  # transformers' own re-tie must not break on the factorized modules
    assert model.get_output_embeddings().factorization is model.get_input_embeddings().factorization
    factor_ids = {id(p) for p in embedding.factorization.parameters()}
    assert sum(id(p) in factor_ids for p in model.parameters()) == len(factor_ids)  # counted once

    kt.decompress_model(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_untied_head_follows_the_lm_head_spec():
    auto_class, kwargs, _ = ARCHITECTURES["llama"]
    from transformers import AutoConfig

    torch.manual_seed(0)
    model = auto_class.from_config(AutoConfig.for_model("llama", **{**kwargs, "tie_word_embeddings": False}))
    kt.compress_model(model, kt.KronConfig(embedding=kt.Word2KetXS(rank=4), lm_head=kt.Shapeshifter(rank=3)))
    head = model.get_output_embeddings()
    assert isinstance(head, kt.KronLinear) and head.factorization.rank == 3
    assert head.factorization is not model.get_input_embeddings().factorization
    assert kt.applied_config(model).modules["lm_head"]["role"] == "lm_head"


UNTIED_HEADS = {
    "dense_head": lambda: kt.KronConfig(embedding=kt.Word2KetXS(rank=4), untie_lm_head=True),
    "head_with_its_own_spec": lambda: kt.KronConfig(
        embedding=kt.Word2KetXS(rank=4), lm_head=kt.LowRank(rank=3), untie_lm_head=True
    ),
    "head_only": lambda: kt.KronConfig(lm_head=kt.LowRank(rank=3), untie_lm_head=True),
}


def _with_separate_tables(dense: nn.Module, input_table: torch.Tensor, head_weight: torch.Tensor) -> nn.Module:
    """``dense`` (tied) with ``input_table`` in every input embedding and ``head_weight`` in the output layer."""
    head, tied = dense.get_output_embeddings(), dense.get_input_embeddings().weight
    for module in list(dense.modules()):
        if getattr(module, "weight", None) is tied:
            module.weight = nn.Parameter((head_weight if module is head else input_table).clone())
    return dense


def assert_reloads_exactly(reloaded, model, inputs):
    """Bit-identical tensors, and logits equal up to rounding: a weight read from safetensors can sit 8 bytes off a
    64-byte boundary, and BLAS then sums in another order (measured: 1.1e-16 apart in float64)."""
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(UNTIED_HEADS))
@pytest.mark.parametrize("architecture", TEXT_ARCHITECTURES)
def test_untie_lm_head_gives_a_tied_head_its_own_weight(architecture, case, tmp_path):
    model = build_model(architecture).double()
    table = model.get_input_embeddings().weight.detach().clone()
    dense = copy.deepcopy(model)
    kt.compress_model(model, UNTIED_HEADS[case]())
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert not isinstance(head, TiedFactorizedHead)
    assert isinstance(embedding, FactorizedEmbedding) == (case != "head_only")
    assert isinstance(head, FactorizedLinear) == (case != "dense_head")
    if case == "dense_head":
        assert torch.equal(head.weight, table)  # the dense table, now the head's alone
    else:
        assert not isinstance(embedding, FactorizedEmbedding) or head.factorization is not embedding.factorization
    input_table = embedding.materialize() if isinstance(embedding, FactorizedEmbedding) else table
    head_weight = head.materialize() if isinstance(head, FactorizedLinear) else table
    reference = _with_separate_tables(dense, input_table.detach(), head_weight.detach())
    inputs = make_inputs(architecture)
    expected = logits(reference, inputs)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-10, atol=1e-10)
    model.tie_weights()  # transformers' re-tie leaves the untied head alone
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-10, atol=1e-10)

    model.save_pretrained(tmp_path)
    reloaded = ARCHITECTURES[architecture][0].from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert_reloads_exactly(reloaded, model, inputs)
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in model.modules()]

    with pytest.warns(UserWarning, match="keeps its own weight .untie_lm_head=True., but config.tie_word_embeddings"):
        kt.decompress_model(model)
    head = model.get_output_embeddings()
    assert head.weight is not model.get_input_embeddings().weight
    model.tie_weights()
    assert head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("architecture", TEXT_ARCHITECTURES)
def test_untie_lm_head_after_compression_keeps_the_logits_and_frees_the_head(architecture, tmp_path):
    model = kt.compress_model(build_model(architecture).double(), kt.KronConfig(embedding=kt.Word2KetXS(rank=4)))
    inputs = make_inputs(architecture)
    expected = logits(model, inputs)
    table = model.get_input_embeddings().materialize().detach().clone()
    assert kt.untie_lm_head(model) is model
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and torch.equal(head.weight, table)
    config = kt.applied_config(model)
    assert config.untie_lm_head and all(entry["kind"] != "tied_head" for entry in config.modules.values())
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-12, atol=1e-12)
    model.train()
    model(**inputs).loss.backward()
    factors = list(model.get_input_embeddings().factorization.parameters())
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(factor.grad is not None for factor in factors) and all(f is not head.weight for f in factors)
    model.eval().tie_weights()
    assert model.get_output_embeddings() is head and torch.equal(head.weight, table)

    model.save_pretrained(tmp_path)
    reloaded = ARCHITECTURES[architecture][0].from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert_reloads_exactly(reloaded, model, inputs)
    assert type(reloaded.get_output_embeddings()) is nn.Linear and kt.applied_config(reloaded).untie_lm_head
    with pytest.raises(ValueError, match="untie_lm_head: the model has no output head tied to a compressed"):
        kt.untie_lm_head(reloaded)
    with pytest.raises(ValueError, match="nothing to untie"):
        kt.untie_lm_head(build_model(architecture))


BAD_CONFIGS = {
    "rank_too_large": (
        lambda: kt.KronConfig(attention=kt.Shapeshifter(rank=2), ffn=kt.LowRank(rank=500)),
        "rank 500 exceeds the maximum",
    ),
    "embedding_method_on_linears": (
        lambda: kt.KronConfig(attention=kt.Word2KetXS(rank=2)),
        "Word2KetXS applies to embedding layers only",
    ),
    "kpd_block_does_not_tile": (lambda: kt.KronConfig(ffn=kt.KPD(rank=1, block_size=(5, 5))), "does not tile"),
    "spec_for_tied_head": (
        lambda: kt.KronConfig(embedding=kt.Word2KetXS(rank=2), lm_head=kt.LowRank(rank=2)),
        "is tied to",
    ),
    "head_without_its_tied_embedding": (lambda: kt.KronConfig(lm_head=kt.LowRank(rank=2)), "is tied to"),
    "bad_regex": (
        lambda: kt.KronConfig(default=kt.LowRank(rank=2), target_modules="(["),
        "not a valid regular expression",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_raises_and_leaves_the_model_untouched(case):
    model = build_model("bert")
    before = snapshot(model)
    make, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message) as error:
        kt.compress_model(model, make())
    assert_unchanged(model, before)
    if case == "rank_too_large":
        assert "intermediate.dense" in str(error.value) and "64x32" in str(error.value)


def test_unmatched_patterns_warn():
    model = build_model("bert")
    config = kt.KronConfig(
        attention=kt.Shapeshifter(rank=2),
        exclude_modules=["no_such_module"],
        rules={"also_missing": kt.LowRank(rank=2)},
    )
    with pytest.warns(UserWarning) as record:
        kt.compress_model(model, config)
    messages = " ".join(str(w.message) for w in record)
    assert "'no_such_module' matched no" in messages and "'also_missing' matched no" in messages


def test_targeting_rules_exclusions_and_all_linear():
    model = build_model("bert")
    config = kt.KronConfig(
        default=kt.LowRank(rank=2),
        target_modules="all-linear",
        rules={r".*attention\.self\.query": kt.Shapeshifter(rank=2), "value": None},
        exclude_modules=r"bert\.encoder\.layer\.1\..*",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kt.compress_model(model, config)
    modules = kt.applied_config(model).modules
    assert modules["bert.encoder.layer.0.attention.self.query"]["method"] == "Shapeshifter"
    assert modules["bert.encoder.layer.0.attention.self.key"]["method"] == "LowRank"
    assert modules["cls.predictions.transform.dense"]["role"] == "other"  # reached only through all-linear
    assert "bert.encoder.layer.0.attention.self.value" not in modules  # rule None keeps it dense
    assert not any(name.startswith("bert.encoder.layer.1.") for name in modules)  # excluded
    assert "cls.predictions.decoder" not in modules  # the output head is not a target of all-linear


def test_target_modules_list_matches_suffixes():
    model = build_model("llama")
    kt.compress_model(
        model,
        kt.KronConfig(
            attention=kt.Shapeshifter(rank=2), ffn=kt.LowRank(rank=2), target_modules=["q_proj", "down_proj"]
        ),
    )
    names = set(kt.applied_config(model).modules)
    assert names == {f"model.layers.{i}.{leaf}" for i in range(2) for leaf in ("self_attn.q_proj", "mlp.down_proj")}


def test_gpt2_conv1d_and_fused_qkv():
    model = build_model("gpt2")
    inputs = make_inputs("gpt2")
    reference = logits(model, inputs)
    kt.compress_model(model, kt.KronConfig(rules=full_rank_rules(model)))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, kt.KronLinear) and c_attn.weight_layout == CONV1D_LAYOUT
    assert c_attn.weight.shape == (32, 96)  # Conv1D's (in, out) with q, k, v fused
    torch.testing.assert_close(logits(model, inputs), reference, rtol=1e-4, atol=1e-4)
    kt.decompress_model(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(logits(model, inputs), reference, rtol=1e-4, atol=1e-4)


def test_bart_scaled_embeddings_keep_their_scale():
    model = build_model("bart")
    scale = model.get_input_embeddings().embed_scale
    assert scale != 1.0
    kt.compress_model(model, kt.KronConfig(embedding=kt.Word2KetXS(rank=4)))
    embedding = model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 1]])  # 1 is BART's padding id
    output = embedding(ids)
    torch.testing.assert_close(output, scale * embedding.materialize()[ids])
    assert torch.count_nonzero(output[0, 2]) == 0
    kt.decompress_model(model)
    assert type(model.get_input_embeddings()).__name__ == "BartScaledWordEmbedding"
    torch.testing.assert_close(model.get_input_embeddings()(ids), output)


def test_record_on_config_is_json_and_complete():
    model = build_model("t5")
    kt.compress_model(model, METHODS["word2ketxs_kpd"]())
    record = model.config.quantization_config.to_dict()
    assert json.loads(model.config.to_json_string())["quantization_config"] == record
    assert record["quant_method"] == "kron" and record["ffn"]["method"] == "KPD"
    shared = record["modules"]["shared"]
    assert shared["method"] == "Word2KetXS" and shared["structure"]["factorization"] == "kronecker_sum"
    assert record["modules"]["lm_head"] == {**record["modules"]["lm_head"], "kind": "tied_head", "tied_to": "shared"}
    ffn = record["modules"]["encoder.block.0.layer.1.DenseReluDense.wi"]
    assert ffn["structure"] == {"factorization": "kpd", "block_size": [2, 2], "rank": 2}
    assert ffn["shape"] == [64, 32] and ffn["role"] == "ffn"


def test_compressing_twice_is_refused():
    model = build_model("bert")
    kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(rank=2)))
    with pytest.raises(ValueError, match="already compressed"):
        kt.compress_model(model, kt.KronConfig(ffn=kt.Shapeshifter(rank=2)))


def test_compression_target_is_met_per_module():
    model = build_model("bert")
    kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(compression=4), ffn=kt.LowRank(compression=4)))
    report = kt.report(model)
    assert all(row.ratio >= 4 for row in report.modules)
    assert report.total_before == sum(p.numel() for p in build_model("bert").parameters())
    assert report.total_after == sum(p.numel() for p in model.parameters())
    text = str(report)
    assert "model parameters" in text and "Shapeshifter" in text


def test_random_init_matches_the_dense_weight_scale():
    model = build_model("bert")
    dense_std = model.bert.encoder.layer[0].intermediate.dense.weight.std().item()
    kt.compress_model(model, kt.KronConfig(ffn=kt.Shapeshifter(rank=4), init="random"))
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert abs(weight.std().item() / dense_std - 1) < 0.3


def test_plain_torch_module_with_default_spec():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6))
    reference = copy.deepcopy(model)
    kt.compress_model(model, kt.KronConfig(default=kt.Shapeshifter(rank=2), target_modules=["0"]))
    assert isinstance(model[0], kt.KronLinear) and isinstance(model[2], nn.Linear)
    assert kt.applied_config(model).modules["0"]["role"] == "other"
    kt.decompress_model(model)
    x = torch.randn(3, 12)
    assert isinstance(model[0], nn.Linear)
    assert (model(x) - reference(x)).abs().max() < 1.0  # rank-2 approximation, same scale


def test_unsupported_embedding_options_are_refused():
    model = build_model("bert")
    model.get_input_embeddings().max_norm = 1.0
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"max_norm=1.0\) is not supported"):
        kt.compress_model(model, kt.KronConfig(embedding=kt.Word2KetXS(rank=2), attention=kt.Shapeshifter(rank=2)))
    assert_unchanged(model, before)


def test_frozen_weights_give_frozen_factors():
    model = build_model("bert")
    model.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(rank=2)))
    assert not any(
        p.requires_grad for p in model.bert.encoder.layer[0].attention.self.query.factorization.parameters()
    )
    assert all(p.requires_grad for p in model.bert.encoder.layer[0].attention.self.key.factorization.parameters())
