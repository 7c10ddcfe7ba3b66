"""TT-Rec (Yin et al.): tensor-train ops, factorization, TTEmbedding / TTEmbeddingBag, LFU cache, kt.TensorTrain."""

from __future__ import annotations

import copy
import json
import math
import string

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, build_model, make_inputs
from safetensors.torch import load_file, save_file

import kron_transformers as kt
from kron_transformers.factorizations.tensor_train import (
    TensorTrainFactorization,
    max_tt_ranks,
    resolve_tt_ranks,
    tt_num_parameters,
    tt_shapes,
)
from kron_transformers.kernels import tt_gather_rows, tt_materialize


def random_cores(shapes, ranks, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    bonds = [1, *ranks, 1]
    return [
        torch.randn(bonds[k], m, n, bonds[k + 1], dtype=dtype, generator=generator) for k, (m, n) in enumerate(shapes)
    ]


def explicit_table(cores, rows, cols):
    """``W[(i..), (j..)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]`` in one einsum (Yin et al., eq. 2)."""
    d = len(cores)
    bonds, row_letters, col_letters = string.ascii_uppercase[: d + 1], "abcdefgh"[:d], "ijklmnop"[:d]
    inputs = ",".join(f"{bonds[k]}{row_letters[k]}{col_letters[k]}{bonds[k + 1]}" for k in range(d))
    full = torch.einsum(f"{inputs}->{bonds[0]}{row_letters}{col_letters}{bonds[d]}", *cores)
    height = math.prod(core.shape[1] for core in cores)
    width = math.prod(core.shape[2] for core in cores)
    return full.reshape(height, width)[:rows, :cols]


CASES = [  # (shapes, ranks, rows, cols): odd shapes, ranks > 1, d = 2, 3, 4, cropped rows and columns
    ([(5, 3), (7, 2)], [3], 33, 5),
    ([(3, 2), (5, 3), (2, 3)], [4, 3], 29, 17),
    ([(2, 3), (3, 1), (2, 2), (3, 2)], [2, 5, 3], 36, 12),
]


@pytest.mark.parametrize(("shapes", "ranks", "rows", "cols"), CASES)
def test_lookup_equals_materialized_equals_explicit_formula(shapes, ranks, rows, cols):
    cores = random_cores(shapes, ranks)
    reference = explicit_table(cores, rows, cols)
    torch.testing.assert_close(tt_materialize(cores, rows, cols), reference, rtol=0, atol=1e-12)
    ids = torch.tensor([[0, rows - 1, 7, 7], [3, 0, rows - 2, 11]])
    torch.testing.assert_close(tt_gather_rows(ids, cores, cols), reference[ids], rtol=0, atol=1e-12)
    assert tt_gather_rows(torch.empty(0, 3, dtype=torch.long), cores, cols).shape == (0, 3, cols)


@pytest.mark.parametrize(("shapes", "ranks", "rows", "cols"), CASES)
def test_core_gradients_equal_autograd_through_the_materialized_table(shapes, ranks, rows, cols):
    cores = [core.requires_grad_() for core in random_cores(shapes, ranks)]
    ids = torch.tensor([1, 5, 5, rows - 1, 0, 5])
    cotangent = torch.randn(len(ids), cols, dtype=torch.float64)
    grads = torch.autograd.grad((tt_gather_rows(ids, cores, cols) * cotangent).sum(), cores)
    expected = torch.autograd.grad((tt_materialize(cores, rows, cols)[ids] * cotangent).sum(), cores)
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)


def test_gather_builds_each_distinct_row_once(monkeypatch):
    cores = random_cores([(3, 2), (5, 3), (2, 3)], [4, 3])
    batch_sizes = []
    original_bmm = torch.bmm

    def recording_bmm(left, right):
        batch_sizes.append(left.shape[0])
        return original_bmm(left, right)

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    rows = tt_gather_rows(torch.tensor([4, 4, 4, 9, 4, 9, 2]), cores, 18)
    assert batch_sizes == [3, 3]  # two chained products, over the 3 distinct ids only
    torch.testing.assert_close(rows[0], rows[4])


@pytest.mark.parametrize(
    ("rows", "cols", "num_cores"),
    [(50000, 768, 3), (30522, 768, 3), (32128, 512, 3), (10**6, 64, 3), (1000, 1024, 3), (30522, 768, 2)]
    + [(30522, 768, 4), (50257, 300, 3), (1000, 307, 3)],
)
def test_automatic_shapes_pad_the_vocabulary_and_factor_the_dimension_exactly(rows, cols, num_cores):
    shapes = tt_shapes(rows, cols, num_cores)
    assert len(shapes) == num_cores
    assert math.prod(n for _, n in shapes) == cols
    assert rows <= math.prod(m for m, _ in shapes) <= 1.1 * rows + 10
    embedding = kt.TTEmbedding(rows, cols, num_cores=num_cores, tt_ranks=4)
    assert embedding.factorization.tt_shapes == tuple(shapes)


def test_automatic_shapes_of_common_tables():
    assert sorted(n for _, n in tt_shapes(50000, 768, 3)) == [8, 8, 12]
    assert sorted(n for _, n in tt_shapes(1000, 1024, 3)) == [8, 8, 16]
    assert sorted(m for m, _ in tt_shapes(10**6, 64, 3)) == [64, 125, 125]
    sizes = [m * n for m, n in tt_shapes(30522, 768, 3)]
    assert sizes[1] == min(sizes)  # the cheapest core sits in the middle, where it costs R^2 m n


def test_ranks_are_validated_and_clipped():
    shapes = ((2, 3), (4, 2), (3, 2))
    assert max_tt_ranks(shapes) == [6, 6]
    assert resolve_tt_ranks(4, shapes, "t") == [4, 4]
    assert resolve_tt_ranks([100, 2], shapes, "t") == [6, 2]
    assert tt_num_parameters(shapes, [4, 2]) == 1 * 6 * 4 + 4 * 8 * 2 + 2 * 6 * 1
    for bad, error, match in (
        (0, ValueError, ">= 1"),
        ([4], ValueError, "one int or 2 ints"),
        ("4", TypeError, "an int or a list"),
        (2.5, TypeError, "an int or a list"),
    ):
        with pytest.raises(error, match=match):
            kt.TTEmbedding(20, 12, tt_shapes=shapes, tt_ranks=bad)


def test_bad_shapes_and_ids_raise_clear_errors():
    with pytest.raises(ValueError, match="num_cores must be an int >= 2"):
        kt.TTEmbedding(100, 8, num_cores=1)
    with pytest.raises(ValueError, match="smaller than the 100x8"):
        kt.TTEmbedding(100, 8, num_cores=2, tt_shapes=[(5, 2), (5, 4)])
    with pytest.raises(ValueError, match="2 tt_shapes given for num_cores=3"):
        kt.TTEmbedding(100, 8, tt_shapes=[(10, 2), (10, 4)])
    with pytest.raises(ValueError, match="init must be one of"):
        kt.TTEmbedding(100, 8, init="uniform")
    with pytest.raises(ValueError, match="cache_fraction"):
        kt.TTEmbeddingBag(100, 8, cache_fraction=2.0)
    embedding = kt.TTEmbedding(100, 8, tt_ranks=2)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 100\), got values in \[3, 100\]"):
        embedding(torch.tensor([3, 100]))
    with pytest.raises(ValueError, match="ids must be in"):
        embedding(torch.tensor([-1]))
    with pytest.raises(TypeError, match="int32/int64"):
        embedding(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="TTEmbeddingBag: ids must be in"):
        kt.TTEmbeddingBag(100, 8, tt_ranks=2)(torch.tensor([[1, 200]]))


def entry_statistics(table):
    values = table.detach().double().flatten()
    std = values.std()
    return float(values.mean() / std), float(std), float(((values - values.mean()) ** 4).mean() / std**4)


@pytest.mark.parametrize("num_cores", [2, 3, 4])
def test_sampled_gaussian_init_gives_entries_close_to_normal_with_variance_one_over_3n(num_cores):
    torch.manual_seed(0)
    rows = 8000
    table = kt.TTEmbedding(rows, 64, num_cores=num_cores, tt_ranks=8).materialize()
    relative_mean, std, kurtosis = entry_statistics(table)
    assert abs(relative_mean) < 0.02
    assert std == pytest.approx(math.sqrt(1 / (3 * rows)), rel=0.1)
    assert 2.0 < kurtosis < 4.5


def test_tail_sampling_makes_a_product_of_cores_gaussian_like():
    torch.manual_seed(0)
    rows = 8000
    # Yin et al., Algorithm 3: without the tail sampling a product of 3 normal cores has kurtosis 3^3 = 27.
    _, _, sampled_kurtosis = entry_statistics(kt.TTEmbedding(rows, 64, tt_ranks=1).materialize())
    _, _, normal_kurtosis = entry_statistics(kt.TTEmbedding(rows, 64, tt_ranks=1, init="glorot").materialize())
    assert 2.5 < sampled_kurtosis < 4.0 and normal_kurtosis > 10


def test_glorot_init_matches_its_variance():
    torch.manual_seed(0)
    relative_mean, std, _ = entry_statistics(kt.TTEmbedding(3000, 100, tt_ranks=8, init="glorot").materialize())
    assert abs(relative_mean) < 0.02
    assert std == pytest.approx(math.sqrt(2 / 3100), rel=0.1)


def test_tt_svd_is_exact_at_full_rank_and_improves_with_rank():
    torch.manual_seed(0)
    weight = torch.randn(37, 12, dtype=torch.float64)
    shapes = [(3, 2), (4, 3), (4, 2)]
    full = TensorTrainFactorization.from_dense(weight, tt_ranks=10**6, tt_shapes=shapes)
    assert full.tt_ranks == max_tt_ranks(tuple(shapes))
    torch.testing.assert_close(full.materialize(), weight, rtol=0, atol=1e-10)
    smooth = torch.outer(torch.linspace(0, 1, 37), torch.linspace(1, 2, 12)).double() + 0.1 * weight
    fits = [TensorTrainFactorization.from_dense(smooth, rank, tt_shapes=shapes) for rank in (1, 2, 4, 8)]
    errors = [fit.relative_error(smooth) for fit in fits]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    module = kt.TTEmbedding.from_pretrained(weight.float(), tt_ranks=10**6, tt_shapes=shapes, freeze=True)
    torch.testing.assert_close(module.weight, weight.float(), rtol=0, atol=1e-4)
    assert not any(p.requires_grad for p in module.parameters())


def test_embedding_two_dimensional_input_padding_and_gradients():
    torch.manual_seed(0)
    embedding = kt.TTEmbedding(50, 6, tt_ranks=3, padding_idx=4).double()
    table = embedding.materialize()
    assert torch.equal(table[4], torch.zeros(6, dtype=torch.float64))
    ids = torch.tensor([[1, 4, 49, 1], [4, 0, 7, 7]])
    output = embedding(ids)
    assert output.shape == (2, 4, 6)
    torch.testing.assert_close(output, table[ids], rtol=0, atol=1e-12)
    assert torch.equal(embedding(ids.int()), output)
    assert embedding.num_parameters() == tt_num_parameters(embedding.factorization.tt_shapes, [3, 3])
    cotangent = torch.randn_like(output)
    cores = list(embedding.factorization.cores)
    grads = torch.autograd.grad((output * cotangent).sum(), cores)
    expected = torch.autograd.grad((embedding.materialize()[ids] * cotangent).sum(), cores)
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference)
    assert "tt_ranks=[3, 3]" in repr(embedding)


BAG_CASES = [
    # (input, offsets, per_sample_weights?, mode, padding_idx, include_last_offset)
    ([3, 3, 7, 0, 40, 3], [0, 2, 2, 5], False, "sum", None, False),  # an empty bag
    ([3, 3, 7, 0, 40, 3], [0, 2, 2, 5], False, "mean", None, False),
    ([3, 3, 7, 0, 40, 3], [0, 3, 4], False, "max", None, False),
    ([3, 3, 7, 0, 40, 3], [0, 2, 5], True, "sum", None, False),
    ([4, 3, 4, 4, 9, 4], [0, 2, 4], False, "mean", 4, False),
    ([1, 2, 3, 4, 5], [0, 2, 5], False, "sum", None, True),
    ([[1, 2, 2], [5, 5, 5], [40, 0, 1]], None, False, "mean", None, False),
    ([[1, 2, 2], [4, 4, 4], [40, 4, 1]], None, True, "sum", 4, False),
    ([], [0, 0], False, "sum", None, False),
]


@pytest.mark.parametrize(("ids", "offsets", "weighted", "mode", "padding_idx", "last"), BAG_CASES)
@pytest.mark.parametrize("cache", [False, True])
def test_bag_matches_embedding_bag_on_the_materialized_table(ids, offsets, weighted, mode, padding_idx, last, cache):
    torch.manual_seed(0)
    bag = kt.TTEmbeddingBag(
        41, 5, tt_ranks=3, mode=mode, padding_idx=padding_idx, include_last_offset=last, cache_fraction=0.2
    ).double()
    if cache:  # a populated cache: rows 3 and 40 come from cache_weight
        bag.train()(torch.tensor([[3, 3, 40]]))
        bag.factorization.populate_cache()
        bag.factorization.cache_weight.data.add_(1.0)
    input = torch.tensor(ids, dtype=torch.long)
    offsets = None if offsets is None else torch.tensor(offsets)
    weights = torch.rand(input.shape, dtype=torch.float64) if weighted else None
    output = bag(input, offsets, weights)
    reference = F.embedding_bag(
        input, bag.materialize(), offsets, mode=mode, per_sample_weights=weights, padding_idx=padding_idx,
        include_last_offset=last,
    )  # fmt: skip
    torch.testing.assert_close(output, reference, rtol=0, atol=1e-12)
    if output.numel():
        parameters = [p for p in bag.parameters() if p.is_floating_point()]
        cotangent = torch.randn_like(output)
        grads = torch.autograd.grad((output * cotangent).sum(), parameters, allow_unused=True)
        dense = F.embedding_bag(
            input, bag.materialize(), offsets, mode=mode, per_sample_weights=weights, padding_idx=padding_idx,
            include_last_offset=last,
        )  # fmt: skip
        expected = torch.autograd.grad((dense * cotangent).sum(), parameters, allow_unused=True)
        for grad, reference_grad in zip(grads, expected):
            grad = torch.zeros(1) if grad is None else grad
            reference_grad = torch.zeros(1) if reference_grad is None else reference_grad
            torch.testing.assert_close(grad.expand_as(reference_grad), reference_grad)


def warm(module, batches):
    module.train()
    for batch in batches:
        module(torch.tensor(batch))


def test_cache_population_keeps_outputs_identical_and_serves_hits():
    torch.manual_seed(0)
    embedding = kt.TTEmbedding(60, 8, tt_ranks=4, cache_fraction=0.05, cache_warmup_steps=2).double()
    factorization = embedding.factorization
    assert factorization.cache_size == 3
    all_ids = torch.arange(60)
    before = embedding.eval()(all_ids).detach()  # evaluation lookups are not counted
    warm(embedding, [[5, 5, 9, 1, 5], [9, 9, 2, 5, 30], [1]])
    assert kt.on_train_step(embedding, 0, None) == {"factorization.cache_hit_rate": 0.0}  # still warming up
    assert (factorization.cache_ids == -1).all()
    kt.on_train_step(embedding, 2, None)
    assert factorization.cache_ids.tolist() == [1, 5, 9]  # the three most frequent ids, sorted
    torch.testing.assert_close(embedding.eval()(all_ids).detach(), before, rtol=0, atol=1e-14)
    torch.testing.assert_close(embedding.materialize().detach(), before, rtol=0, atol=1e-14)
    warm(embedding, [[5, 9, 5, 40], [9, 41, 42, 5]])  # 5 of 8 lookups are cached
    assert embedding.cache_hit_rate == pytest.approx(5 / 8)
    # Cached rows are trained directly: their gradient reaches cache_weight only.
    loss = embedding(torch.tensor([5, 9])).sum()
    loss.backward()
    assert all(core.grad is None or not core.grad.any() for core in factorization.cores)
    assert factorization.cache_weight.grad.abs().sum(1).nonzero().numel() == 2


def test_eviction_writes_trained_rows_back_into_the_cores():
    torch.manual_seed(0)
    base = kt.TTEmbedding(64, 8, tt_ranks=6, cache_fraction=4 / 64).double()
    warm(base, [[1, 2, 3, 4] * 3 + list(range(10, 40))])
    base.factorization.populate_cache()
    base.factorization.cache_weight.data.add_(0.02 * torch.randn(4, 8, dtype=torch.float64))  # "trained" rows
    trained = base.factorization.cache_weight.detach().clone()
    results = {}
    for steps in (0, 20):
        module = copy.deepcopy(base)
        module.factorization.cache_write_back_steps = steps
        warm(module, [[50, 51, 52, 53] * 3 + list(range(10, 40))])  # a new hot set evicts rows 1..4
        anchors = module.factorization._anchor_ids(torch.tensor([50, 51, 52, 53]), module.factorization.cache_ids)
        anchor_rows = tt_gather_rows(anchors, list(module.factorization.cores), 8).detach()
        module.factorization.populate_cache()
        assert module.factorization.cache_ids.tolist() == [50, 51, 52, 53]
        rows = module(torch.tensor([1, 2, 3, 4])).detach()
        drift = tt_gather_rows(anchors, list(module.factorization.cores), 8).detach() - anchor_rows
        results[steps] = (float((rows - trained).norm() / trained.norm()), float(drift.norm() / anchor_rows.norm()))
    assert results[20][0] < 0.5 * results[0][0], results
    assert results[20][1] < 0.2, results  # the rows still served by the cores barely move


def test_cache_survives_a_safetensors_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    bag = kt.TTEmbeddingBag(80, 6, tt_ranks=3, cache_fraction=0.1, mode="sum")
    warm(bag, [[[1, 2, 3], [4, 4, 4], [70, 71, 1]]])
    bag.factorization.populate_cache()
    bag.factorization.cache_weight.data.add_(1.0)
    save_file(bag.state_dict(), str(tmp_path / "bag.safetensors"))
    fresh = kt.TTEmbeddingBag(80, 6, tt_ranks=3, cache_fraction=0.1, mode="sum")
    fresh.load_state_dict(load_file(str(tmp_path / "bag.safetensors")))
    ids = torch.tensor([[1, 2, 3], [5, 70, 9]])
    assert torch.equal(fresh.factorization.cache_ids, bag.factorization.cache_ids)
    assert torch.equal(fresh.eval()(ids), bag.eval()(ids))
    assert fresh.num_parameters() == 8 * 6 + sum(core.numel() for core in fresh.factorization.cores)


def test_adam_trains_through_cache_refreshes_and_optimizer_state_follows_the_rows():
    torch.manual_seed(0)
    bag = kt.TTEmbeddingBag(200, 8, tt_ranks=4, mode="sum", cache_fraction=0.01, cache_warmup_steps=1)
    bag.factorization.cache_refresh_every = 2
    target = torch.randn(200, 8)
    optimizer = torch.optim.Adam(bag.parameters(), lr=0.05)
    losses = []
    streams = [[[5, 9, 5, 9, 100]]] * 4 + [[[9, 20, 20, 9, 100]]] * 4
    for step, batch in enumerate(streams):
        input = torch.tensor(batch)
        loss = (bag.train()(input) - target[input].sum(1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step == 5:  # before the refresh (steps 1, 3, 5) that moves row 9 from slot 1 to slot 0
            assert bag.factorization.cache_ids.tolist() == [5, 9]
            state_before = optimizer.state[bag.factorization.cache_weight]["exp_avg"].clone()
        metrics = kt.on_train_step(bag, step, optimizer)
        if step == 5:
            assert bag.factorization.cache_ids.tolist() == [9, 20]
            moved = optimizer.state[bag.factorization.cache_weight]["exp_avg"]
            assert torch.equal(moved[0], state_before[1]) and not moved[1].any()
    assert "factorization.cache_hit_rate" in metrics
    assert losses[-1] < losses[4]


def test_spec_defaults_compression_and_serialization():
    structure = kt.TensorTrain().resolve(30522, 768, "embedding", "emb")
    assert structure["tt_ranks"] == [16, 16] and math.prod(n for _, n in structure["tt_shapes"]) == 768
    budget = kt.TensorTrain(compression=200).resolve(30522, 768, "embedding", "emb")
    assert tt_num_parameters(budget["tt_shapes"], budget["tt_ranks"]) <= 30522 * 768 / 200
    assert kt.TensorTrain(cache_fraction=0.1).resolve(100, 8, "embedding", "emb")["cache_size"] == 10
    config = kt.KronConfig(embedding=kt.TensorTrain(tt_ranks=[4, 8], cache_fraction=0.01))
    assert kt.KronConfig.from_dict(json.loads(config.to_json_string())).embedding == config.embedding
    for kwargs, match in (
        ({"rank": 4}, "set tt_ranks="),
        ({"tt_ranks": 4, "compression": 10}, "not both"),
        ({"num_cores": 1}, "num_cores"),
        ({"tt_ranks": 0}, "positive int"),
        ({"tt_ranks": [4, 4, 4]}, "3 tt_ranks given for num_cores=3"),
        ({"init": "svd"}, "init must be one of"),
        ({"tt_shapes": [[10, 2]]}, "1 tt_shapes given"),
    ):
        with pytest.raises(ValueError, match=match):
            kt.TensorTrain(**kwargs)
    with pytest.raises(ValueError, match="applies to embedding layers only"):
        kt.TensorTrain().resolve(64, 64, "linear", "fc")


@pytest.mark.parametrize("architecture", ["bert", "gpt2", "t5"])
def test_compress_model_trains_with_the_cache_and_round_trips_through_save_pretrained(tmp_path, architecture):
    model = build_model(architecture)
    config = kt.KronConfig(embedding=kt.TensorTrain(tt_ranks=8, cache_fraction=0.1, cache_warmup_steps=1))
    kt.compress_model(model, config)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, kt.TTEmbedding)
    assert isinstance(model.get_output_embeddings(), kt.TiedFactorizedHead)
    inputs = make_inputs(architecture)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(3):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kt.on_train_step(model, step, optimizer)
    assert (embedding.factorization.cache_ids >= 0).sum() == embedding.factorization.cache_size
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    table = "\n".join(str(kt.report(model)).splitlines())
    assert "TensorTrain" in table and "cache 10 rows" in table
    model.save_pretrained(tmp_path)
    loaded = ARCHITECTURES[architecture][0].from_pretrained(tmp_path).eval()
    loaded_cache_ids = loaded.get_input_embeddings().factorization.cache_ids
    assert torch.equal(loaded_cache_ids, embedding.factorization.cache_ids)
    assert isinstance(loaded_cache_ids, kt.factorizations.tensor_train.IndexParameter)
    loaded.requires_grad_(True)  # skips the integer cache ids instead of raising
    assert not loaded_cache_ids.requires_grad and embedding.factorization.cores[0].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    kt.decompress_model(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_random_init_through_compress_model_matches_the_dense_scale():
    model = build_model("bert")
    dense_std = float(model.get_input_embeddings().weight.detach().std())
    kt.compress_model(model, kt.KronConfig(embedding=kt.TensorTrain(tt_ranks=8), init="random"))
    assert float(model.get_input_embeddings().materialize().detach().std()) == pytest.approx(dense_std, rel=0.3)
