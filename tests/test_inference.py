"""Inference cache (``kt.prepare_for_inference``), the lazy dense ``weight`` view and the matmul-path cost model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_model, make_inputs

import kron_transformers as kt
from kron_transformers.factorizations import cost
from kron_transformers.factorizations.kronecker import factored_is_cheaper


def count_materialize(monkeypatch, factorization) -> list[int]:
    calls: list[int] = []
    original = factorization.materialize
    monkeypatch.setattr(factorization, "materialize", lambda: (calls.append(1), original())[1])
    return calls


def odd_layer() -> kt.KronLinear:
    torch.manual_seed(0)
    return kt.KronLinear(11, 13, rank=3, factor_shapes=[(4, 3), (4, 4)]).double()


def reference(layer: kt.KronLinear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` with ``W`` rebuilt from the current factors by ``torch.kron`` (float64)."""
    factors = list(layer.factorization.factors)
    dense = sum(torch.kron(factors[0][k], factors[1][k]) for k in range(3))[:13, :11]
    return x @ dense.T + layer.bias


def test_cache_builds_once_and_matches_the_uncached_output(monkeypatch):
    layer = odd_layer()
    x = torch.randn(2, 5, 11, dtype=torch.float64)
    expected = reference(layer, x).detach()
    plan = kt.prepare_for_inference(layer, cache="dense")
    assert plan.cached == {"factorization": 13 * 11 * 8} and not layer.training
    calls = count_materialize(monkeypatch, layer.factorization)
    with torch.no_grad():
        outputs = [layer(x) for _ in range(3)]
    assert len(calls) == 1
    for output in outputs:
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    kt.prepare_for_inference(layer, cache="none")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), outputs[0], rtol=1e-12, atol=1e-12)
    assert len(calls) == 1  # cache="none": the matmul path, nothing cached


def test_an_optimizer_step_invalidates_the_cache():
    layer = odd_layer()
    kt.prepare_for_inference(layer, cache="dense")
    x = torch.randn(4, 11, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = layer(x).square().sum()  # grad enabled, factors require grad: the cache is bypassed
    assert loss.grad_fn is not None
    loss.backward()
    assert all(p.grad is not None for p in layer.parameters())
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference(layer, x), rtol=1e-12, atol=1e-12)


def test_load_state_dict_and_in_place_updates_invalidate_the_cache():
    layer, other = odd_layer(), odd_layer()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.normal_()
    kt.prepare_for_inference(layer, cache="dense")
    x = torch.randn(4, 11, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), reference(other, x), rtol=1e-12, atol=1e-12)
        layer.factorization.factors[1].mul_(2.0)
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-12, atol=1e-12)


def test_to_and_train_drop_the_cache():
    layer = odd_layer()
    kt.prepare_for_inference(layer, cache="dense")
    x = torch.randn(4, 11, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        assert layer.factorization._inference_cache is not None
        layer.float()
        assert layer.factorization._inference_cache is None
        single = layer(x.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, expected.float(), rtol=1e-5, atol=1e-5)
    layer.train()
    assert layer.factorization._inference_cache is None
    with torch.no_grad():
        layer(x.float())  # training mode: no cache even without grad
    assert layer.factorization._inference_cache is None


def test_eval_with_grad_backpropagates_to_the_factors():
    layer = odd_layer()
    kt.prepare_for_inference(layer, cache="dense")
    x = torch.randn(3, 11, dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.factorization._inference_cache is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.factorization.factors)


def test_tied_head_and_embedding_share_one_cache(monkeypatch):
    torch.manual_seed(0)
    embedding = kt.KronEmbedding(23, 6, rank=2, factor_shapes=[(5, 2), (5, 3)], padding_idx=4).double()
    head = kt.TiedFactorizedHead(embedding)
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    ids = torch.tensor([[0, 4, 22, 7]])
    hidden = torch.randn(1, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        expected_rows, expected_logits = embedding(ids), head(hidden)
    plan = kt.prepare_for_inference(model, cache="auto")
    assert list(plan.cached) == ["embedding"]
    calls = count_materialize(monkeypatch, embedding.factorization)
    with torch.no_grad():
        torch.testing.assert_close(embedding(ids), expected_rows, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(head(hidden), expected_logits, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1
    assert torch.equal(head(hidden)[..., 4], torch.zeros(1, 4, dtype=torch.float64))


def test_auto_skips_cheap_structured_products_and_respects_the_budget():
    model = torch.nn.Sequential(
        kt.LowRankLinear(64, 64, rank=2), kt.KronLinear(64, 64, rank=4), kt.KronLinear(64, 32, rank=4)
    )
    plan = kt.prepare_for_inference(model, cache="auto")
    assert set(plan.cached) == {"1", "2"}
    assert "cheaper" in plan.uncached["0"]
    plan = kt.prepare_for_inference(model, cache="auto", memory_budget=64 * 64 * 4)
    assert len(plan.cached) == 1 and plan.cached_bytes <= 64 * 64 * 4
    with pytest.raises(ValueError, match="over memory_budget"):
        kt.prepare_for_inference(model, cache="dense", memory_budget=1000)
    with pytest.raises(ValueError, match="cache must be one of"):
        kt.prepare_for_inference(model, cache="always")
    assert not model[0].factorization.inference_cache_enabled  # the failed calls changed nothing


@pytest.mark.parametrize("name", ["t5", "gpt2"])
def test_generate_is_identical_with_and_without_cache(name):
    model = build_model(name)
    kt.compress_model(
        model, kt.KronConfig(embedding=kt.Word2KetXS(rank=2), attention=kt.Shapeshifter(rank=2), init="svd")
    )
    inputs = {"input_ids": make_inputs(name)["input_ids"]}
    kt.prepare_for_inference(model, cache="none")
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    plan = kt.prepare_for_inference(model, cache="auto")
    assert plan.cached
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, cached) and cached.max() < VOCAB


def test_dtype_probe_does_not_materialize(monkeypatch):
    model = build_model("t5")
    kt.compress_model(model, kt.KronConfig(ffn=kt.Shapeshifter(rank=2), init="svd"))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    calls = count_materialize(monkeypatch, wo.factorization)
    weight = wo.weight
    assert isinstance(weight, torch.Tensor) and not isinstance(weight, torch.nn.Parameter)
    assert (weight.dtype, weight.device, weight.shape, weight.dim()) == (
        torch.float32,
        torch.device("cpu"),
        (32, 64),
        2,
    )
    assert weight.requires_grad and weight.numel() == 32 * 64
    kt.prepare_for_inference(model, cache="none")
    with torch.no_grad():
        model(**make_inputs("t5"))  # T5's feed-forward probes self.wo.weight.dtype on every call
    assert calls == []
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x, wo.weight), x @ wo.weight.detach().T)
    assert len(calls) == 2
    assert wo.weight.to(torch.float64).dtype == torch.float64 and wo.weight.data.grad_fn is None
    assert "weight" not in dict(wo.named_parameters()) and not any(k.endswith("wo.weight") for k in model.state_dict())


def test_dense_view_gradients_reach_the_factors():
    layer = odd_layer()
    x = torch.randn(3, 11, dtype=torch.float64)
    (x @ layer.weight.T).sum().backward()
    assert all(p.grad is not None for p in layer.factorization.factors)


@pytest.mark.parametrize("cache", ["dense", "none"])
def test_compile_fullgraph_in_eval_without_recompiles(cache):
    layer = odd_layer()
    kt.prepare_for_inference(layer, cache=cache)
    x = torch.randn(4, 11, dtype=torch.float64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        first = [compiled(x) for _ in range(3)]
        layer.factorization.factors[0].mul_(0.5)  # a factor update between calls
        updated = compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompile (fullgraph: no break)
    for output in first:
        torch.testing.assert_close(output, first[0])
    torch.testing.assert_close(updated, reference(layer, x), rtol=1e-12, atol=1e-12)


KRON_SHAPES = ((8, 8), (16, 8))  # a 128 x 64 Kronecker sum
FLOP_BOUND = cost.DeviceSpeed(seconds_per_flop=1e-9, seconds_per_byte=0.0, seconds_per_op=0.0)
MEMORY_BOUND = cost.DeviceSpeed(seconds_per_flop=0.0, seconds_per_byte=1e-9, seconds_per_op=0.0)
LAUNCH_BOUND = cost.DeviceSpeed(seconds_per_flop=0.0, seconds_per_byte=0.0, seconds_per_op=1e-6)


@pytest.mark.parametrize(
    ("speed", "rank", "tokens", "requires_grad", "factored"),
    [
        (FLOP_BOUND, 2, 4096, False, True),  # rank 2: fewer multiply-adds than the dense product itself
        (FLOP_BOUND, 8, 4, False, True),  # building W costs more than the product on few tokens
        (FLOP_BOUND, 8, 4096, False, False),  # W amortized over many tokens
        (FLOP_BOUND, 16, 64, True, False),  # forward and backward
        (MEMORY_BOUND, 2, 4096, False, False),  # the factored intermediates move more bytes than W
        (MEMORY_BOUND, 2, 1, False, True),
        (LAUNCH_BOUND, 2, 4, True, True),  # fewer launches
    ],
)
def test_cost_model_follows_the_calibration(speed, rank, tokens, requires_grad, factored):
    factors = [torch.randn(rank, a, b) for a, b in KRON_SHAPES]
    x = torch.randn(tokens, 64, requires_grad=requires_grad)
    cost.set_cost_model("count")
    cost.set_device_speed("cpu", torch.float32, speed)
    try:
        assert factored_is_cheaper(x, factors, 128, 64) is factored
    finally:
        cost.set_device_speed("cpu", torch.float32, None)
        cost.set_cost_model(None)


def test_measured_decisions_are_remembered_per_bucket(monkeypatch):
    timings = []

    def stub_benchmark(run_factored, run_materialize, factors, tokens, cols, backward):
        timings.append((tokens, backward))
        return tokens < 100  # a stub calibration: factored below 100 tokens, materialize above

    monkeypatch.setattr(cost, "_measure_factored_is_faster", stub_benchmark)
    cost.set_cost_model("measure")
    cost.clear_decisions()
    try:
        factors = [torch.randn(2, a, b) for a, b in KRON_SHAPES]
        with torch.no_grad():
            decisions = [factored_is_cheaper(torch.randn(n, 64), factors, 128, 64) for n in (3, 4, 200, 256, 3)]
        assert decisions == [True, True, False, False, True]
        assert timings == [(4, False), (256, False)]
        for mode, expected in (("factored", True), ("materialize", False)):
            cost.set_cost_model(mode)
            assert factored_is_cheaper(torch.randn(200, 64), factors, 128, 64) is expected
    finally:
        cost.set_cost_model(None)
        cost.clear_decisions()
    with pytest.raises(ValueError, match="mode must be one of"):
        cost.set_cost_model("fastest")


def test_deterministic_algorithms_make_count_the_default(monkeypatch):
    monkeypatch.delenv(cost.COST_MODEL_ENV, raising=False)
    assert cost.cost_model() == "measure"
    torch.use_deterministic_algorithms(True)
    try:
        assert cost.cost_model() == "count"
        monkeypatch.setenv(cost.COST_MODEL_ENV, "factored")  # a mode set explicitly still applies
        assert cost.cost_model() == "factored"
        cost.set_cost_model("materialize")
        assert cost.cost_model() == "materialize"
    finally:
        cost.set_cost_model(None)
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(("margin", "measured"), [(1.0, False), (1e12, True)])
def test_counts_far_apart_decide_without_a_measurement(monkeypatch, margin, measured):
    """Timing a path the counts already rule out only costs time and memory (rank ~180: gigabytes)."""
    timings = []

    def stub_benchmark(run_factored, run_materialize, factors, tokens, cols, backward):
        timings.append(tokens)
        return True

    monkeypatch.setattr(cost, "_measure_factored_is_faster", stub_benchmark)
    monkeypatch.setattr(cost, "CLEAR_MARGIN", margin)
    cost.set_device_speed("cpu", torch.float32, cost.DeviceSpeed(1e-9, 1e-9, 1e-6))
    cost.set_cost_model("measure")
    cost.clear_decisions()
    try:
        factors = [torch.randn(2, a, b) for a, b in KRON_SHAPES]
        with torch.no_grad():
            factored_is_cheaper(torch.randn(64, 64), factors, 128, 64)
        assert (timings == [64]) is measured
    finally:
        cost.set_device_speed("cpu", torch.float32, None)
        cost.set_cost_model(None)
        cost.clear_decisions()


def test_hf_utilities_read_the_view_of_a_tied_embedding(monkeypatch):
    model = build_model("gpt2")
    kt.compress_model(model, kt.KronConfig(embedding=kt.Word2KetXS(rank=2)))
    embedding = model.get_input_embeddings()
    calls = count_materialize(monkeypatch, embedding.factorization)
    assert model.dtype == torch.float32 and embedding.weight.shape == (VOCAB, 32)
    assert model.get_output_embeddings().weight.shape == (VOCAB, 32) and calls == []
    with pytest.raises(TypeError, match="not an instance of"):  # transformers refuses to resize a factorized table
        model.resize_token_embeddings(VOCAB + 8)
    assert model.get_input_embeddings() is embedding
