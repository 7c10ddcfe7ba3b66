"""NeuKron (Kwon et al.): digit layout, exact norms and errors, fitting, reordering, inputs, save/load."""

import json
import math

import numpy as np
import pytest
import scipy.sparse
import torch

import kron_transformers as kt
from kron_transformers.neukron import (
    DigitSequenceModel,
    KroneckerLayout,
    NeuKron,
    as_sparse_input,
    minhash_signatures,
    propose_swaps,
    reorder_mode,
)


def planted_kronecker(seeds):
    product = seeds[0]
    for seed in seeds[1:]:
        product = torch.kron(product, seed)
    return product


def random_sparse(shape, density, generator, signed=False):
    dense = torch.rand(shape, generator=generator, dtype=torch.float64)
    if signed:
        dense = dense - 0.5
    return dense * (torch.rand(shape, generator=generator) < density)


def all_positions(shape):
    grid = torch.meshgrid(*[torch.arange(size) for size in shape], indexing="ij")
    return torch.stack([axis.reshape(-1) for axis in grid])


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The models are tiny: one intra-op thread avoids oversubscribing a loaded CI box (10x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    """A 16x16 Kronecker power of four positive 2x2 seeds, fitted without reordering."""
    generator = torch.Generator().manual_seed(0)
    matrix = planted_kronecker([torch.rand(2, 2, generator=generator, dtype=torch.float64) + 0.1 for _ in range(4)])
    compressor = NeuKron(hidden_size=8, dtype="float64").fit(matrix.to_sparse(), epochs=150, lr=0.05, reorder=False)
    return matrix, compressor


def test_tokens_are_most_significant_first_mixed_radix_digits():
    layout = KroneckerLayout((3, 20), (2, 3))  # rows: 2 binary digits, cols: 3 ternary digits
    assert layout.mode_levels == (2, 3) and layout.padded_shape == (4, 27)
    assert layout.level_extents == ((2, 3), (2, 3), (1, 3)) and layout.head_sizes == (6, 3)
    assert layout.level_heads == (0, 0, 1)
    rows, cols = torch.tensor([2, 1]), torch.tensor([19, 5])
    tokens = layout.tokens(torch.stack([rows, cols]))
    # 2 = (1, 0)_2 and 19 = (2, 0, 1)_3 ; 1 = (0, 1)_2 and 5 = (0, 1, 2)_3
    assert tokens.tolist() == [[1 * 3 + 2, 0 * 3 + 0, 1], [0 * 3 + 0, 1 * 3 + 1, 2]]


def test_prefix_independent_factors_reproduce_torch_kron():
    """With zero cell weights the level factors ignore the tokens, so the model is a Kronecker product."""
    torch.manual_seed(0)
    layout = KroneckerLayout((8, 8), (2, 2))
    model = DigitSequenceModel(layout, hidden_size=3).double()
    with torch.no_grad():
        model.cell.weight_hh_l0.zero_()
        model.cell.weight_ih_l0.zero_()
        values = model(layout.tokens(all_positions((8, 8)))).reshape(8, 8)
        outputs, _ = model.cell(torch.zeros(1, 2, 3, dtype=torch.float64))  # inputs are ignored
        factors = [torch.nn.functional.softplus(model.start)]
        factors += [torch.nn.functional.softplus(model.heads[0](outputs[0, step])) for step in range(2)]
    expected = planted_kronecker([(factor / factor.norm()).reshape(2, 2) for factor in factors])
    torch.testing.assert_close(values, model.log_scale.exp() * expected)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_matches_entry_by_entry_recurrence(cell):
    """The prefix-sharing forward equals running the cell over each entry's own digit sequence."""
    torch.manual_seed(3)
    layout = KroneckerLayout((3, 20), (2, 3))
    model = DigitSequenceModel(layout, hidden_size=4, cell=cell, signed=True).double()
    tokens = layout.tokens(all_positions((3, 20)))
    expected = []
    with torch.no_grad():
        for sequence in tokens:
            value, state = model.normalized_factor(model.start)[sequence[0]], None
            for level in range(1, layout.num_levels):
                embedded = model.embedding(sequence[level - 1] + model.input_offsets[level - 1]).view(1, 1, -1)
                output, state = model.cell(embedded, state)
                head = model.heads[layout.level_heads[level]]
                value = value * model.normalized_factor(head(output[0, 0]))[sequence[level]]
            expected.append(value * model.log_scale.exp())
        torch.testing.assert_close(model(tokens), torch.stack(expected))


@pytest.mark.parametrize(
    "shape, seed_shape, cell, signed",
    [((5, 7), (2, 2), "lstm", False), ((3, 20), (2, 3), "gru", True), ((3, 5, 2), (2, 2, 2), "lstm", True)],
)
def test_squared_norm_is_exact_over_the_real_region(shape, seed_shape, cell, signed):
    torch.manual_seed(1)
    layout = KroneckerLayout(shape, seed_shape)
    model = DigitSequenceModel(layout, hidden_size=4, cell=cell, signed=signed).double()
    with torch.no_grad():
        model.log_scale.fill_(0.7)
        real = model(layout.tokens(all_positions(shape))).square().sum()
        padded = model(layout.tokens(all_positions(layout.padded_shape))).square().sum()
        torch.testing.assert_close(model.squared_norm(), real)
        torch.testing.assert_close(padded, torch.tensor(math.exp(1.4), dtype=torch.float64))  # unit-norm levels


def test_squared_norm_gradient_matches_dense_autograd():
    torch.manual_seed(2)
    layout = KroneckerLayout((5, 6), (2, 2))
    model = DigitSequenceModel(layout, hidden_size=3).double()
    model.squared_norm().backward()
    fast = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    model(layout.tokens(all_positions((5, 6)))).square().sum().backward()
    for got, parameter in zip(fast, model.parameters()):
        torch.testing.assert_close(got, parameter.grad)


def test_exact_error_matches_dense_computation():
    generator = torch.Generator().manual_seed(3)
    matrix = random_sparse((11, 6), 0.3, generator)
    compressor = NeuKron(hidden_size=5, dtype="float64").fit(matrix.to_sparse(), epochs=4, reorder_passes=1)
    dense_error = (compressor.reconstruct() - matrix).square().sum().item()
    assert compressor.approximation_error() == pytest.approx(dense_error, rel=1e-10)
    assert compressor.history[-1] >= compressor.approximation_error() - 1e-9  # the best epoch is kept


def test_planted_kronecker_is_fitted_to_near_zero_error_and_error_decreases(planted):
    matrix, compressor = planted
    relative = compressor.approximation_error() / matrix.square().sum().item()
    assert relative < 1e-3
    history = compressor.history
    assert history[0] > history[len(history) // 3] > history[-1]
    assert history[-1] < 0.01 * history[0]
    torch.testing.assert_close(compressor.reconstruct(), matrix, atol=0.05, rtol=0.05)


def test_minibatch_steps_reach_a_lower_error_than_full_batch_steps_in_the_same_epochs(planted):
    matrix, _ = planted
    kwargs = dict(hidden_size=4, dtype="float64")
    fit = dict(epochs=15, lr=0.05, reorder=False)
    full = NeuKron(**kwargs).fit(matrix.to_sparse(), steps_per_epoch=1, **fit)
    minibatch = NeuKron(**kwargs).fit(matrix.to_sparse(), steps_per_epoch=8, **fit)
    assert minibatch.history[-1] < 0.1 * minibatch.history[0]
    assert minibatch.approximation_error() < 0.5 * full.approximation_error()
    assert minibatch.approximation_error() == pytest.approx(min(minibatch.history))


def test_hill_climbing_reorder_recovers_scrambled_rows_with_exact_deltas(planted):
    matrix, fitted = planted
    compressor = NeuKron(hidden_size=8, dtype="float64")
    compressor._build(matrix.shape)
    compressor.model.load_state_dict(fitted.model.state_dict())
    compressor.orders = [torch.randperm(16, generator=torch.Generator().manual_seed(4)), torch.arange(16)]
    data = as_sparse_input(matrix.to_sparse())
    start = compressor.approximation_error(data)
    tracked, generator = start, torch.Generator().manual_seed(5)
    for _ in range(30):
        accepted, change = reorder_mode(
            compressor._evaluate_positions, data, compressor.orders, compressor.layout, 0, math.inf, generator
        )
        assert change <= 0
        tracked += change
        assert compressor.approximation_error(data) == pytest.approx(tracked, rel=1e-9, abs=1e-9)
    assert sorted(compressor.orders[0].tolist()) == list(range(16))
    assert tracked < 0.3 * start


def test_reorder_improves_fit_of_row_shuffled_kronecker_matrix():
    seed = torch.tensor([[1.0, 0.6], [0.5, 0.1]], dtype=torch.float64)
    matrix = planted_kronecker([seed] * 5)
    shuffled = matrix[torch.randperm(32, generator=torch.Generator().manual_seed(0))].to_sparse()
    kwargs = dict(epochs=40, lr=0.05)
    plain = NeuKron(hidden_size=2, dtype="float64").fit(shuffled, reorder=False, **kwargs).approximation_error()
    reordered = NeuKron(hidden_size=2, dtype="float64").fit(shuffled, reorder=True, **kwargs).approximation_error()
    assert reordered < 0.8 * plain


def test_proposals_are_disjoint_and_tiny_gamma_accepts_all():
    generator = torch.Generator().manual_seed(6)
    data = as_sparse_input(random_sparse((13, 9), 0.4, generator).to_sparse())
    compressor = NeuKron(hidden_size=3, dtype="float64").fit(data, epochs=0)
    layout, orders = compressor.layout, compressor.orders
    for mode in (0, 1):
        replay = torch.Generator()
        replay.set_state(generator.get_state())
        first, second = propose_swaps(orders[mode], layout, mode, minhash_signatures(data, mode, replay), replay)
        touched = torch.cat([first, second])
        assert first.numel() > 0 and touched.unique().numel() == touched.numel()
        assert bool((touched < layout.shape[mode]).all())
        before = compressor.approximation_error()
        accepted, change = reorder_mode(compressor._evaluate_positions, data, orders, layout, mode, 1e-300, generator)
        assert accepted == first.numel()
        assert compressor.approximation_error() == pytest.approx(before + change, rel=1e-9)


def test_minhash_signature_is_the_min_hash_of_each_row():
    data = as_sparse_input((torch.tensor([[0, 0, 2], [1, 3, 3]]), torch.ones(3), (4, 5)))
    generator = torch.Generator().manual_seed(0)
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    signatures = minhash_signatures(data, 0, generator)
    a = int(torch.randint(1, 2**31 - 1, (), generator=replay))
    b = int(torch.randint(0, 2**31 - 1, (), generator=replay))
    hashed = [(a * col + b) % (2**31 - 1) for col in range(5)]
    assert signatures.tolist() == [min(hashed[1], hashed[3]), 2**31 - 1, hashed[3], 2**31 - 1]


def test_save_load_gives_identical_predictions(tmp_path):
    generator = torch.Generator().manual_seed(7)
    matrix = random_sparse((10, 7), 0.3, generator)
    compressor = NeuKron(hidden_size=4, cell="gru").fit(matrix.to_sparse(), epochs=3)
    compressor.save(tmp_path)
    loaded = NeuKron.load(tmp_path)
    rows, cols = all_positions((10, 7))
    assert torch.equal(loaded.predict(rows, cols), compressor.predict(rows, cols))
    assert all(torch.equal(a, b) for a, b in zip(loaded.orders, compressor.orders))
    assert loaded.approximation_error(matrix.to_sparse()) == pytest.approx(compressor.approximation_error())
    meta = json.loads((tmp_path / "neukron.json").read_text())
    assert meta["cell"] == "gru" and meta["shape"] == [10, 7] and meta["seed_shape"] == [2, 2]
    with pytest.raises(ValueError, match="pass x"):
        loaded.approximation_error()


def test_order3_tensor_fit_predict_and_parameter_count():
    generator = torch.Generator().manual_seed(8)
    seeds = [torch.rand(2, 2, 2, generator=generator, dtype=torch.float64) + 0.1 for _ in range(3)]
    tensor = torch.einsum("abc,def,ghi->adgbehcfi", *seeds).reshape(8, 8, 8)[:7, :8, :5]
    compressor = NeuKron(hidden_size=6, seed_shape=(2, 2, 2), dtype="float64").fit(tensor.to_sparse(), epochs=40)
    assert compressor.history[-1] < 0.2 * compressor.history[0]
    dense_error = (compressor.reconstruct() - tensor).square().sum().item()
    assert compressor.approximation_error() == pytest.approx(dense_error, rel=1e-9)
    idx = torch.tensor([0, 6])
    assert compressor.predict(idx, idx, torch.tensor([1, 4])).shape == (2,)
    # Theorem 8: parameters = cell + (embedding + head) per seed entry, independent of the tensor's size.
    h, heads = 6, 8  # one 2x2x2 seed for all three levels
    expected = 8 * h * h + 8 * h + heads * h + heads * (h + 1) + heads + 1
    assert compressor.num_parameters() == expected
    bigger = NeuKron(hidden_size=6, seed_shape=(2, 2, 2))
    bigger.fit((torch.tensor([[500], [1], [2]]), [1.0], (512, 512, 8)), epochs=0)
    assert bigger.num_parameters() == expected + 4 * h + 4 * (h + 1)  # plus the 2x2x1 seed of levels 3..8


def test_input_formats_agree():
    generator = torch.Generator().manual_seed(9)
    matrix = random_sparse((6, 5), 0.5, generator)
    rows, cols = torch.nonzero(matrix, as_tuple=True)
    values = matrix[rows, cols]
    formats = [
        matrix.to_sparse(),
        scipy.sparse.csr_matrix(matrix.numpy()),
        (np.stack([rows.numpy(), cols.numpy()]), values.numpy(), (6, 5)),
        (torch.stack([rows, cols]), values.float(), [6, 5]),
    ]
    parsed = [as_sparse_input(x) for x in formats]
    for other in parsed[1:]:
        assert other.shape == (6, 5)
        assert torch.equal(other.indices, parsed[0].indices)
        torch.testing.assert_close(other.values, parsed[0].values, rtol=1e-6, atol=0)
    inferred = as_sparse_input((torch.tensor([[0, 0, 3], [1, 1, 0]]), torch.tensor([1.0, 2.0, 0.0])))
    assert inferred.shape == (4, 2) and inferred.indices.tolist() == [[0], [1]] and inferred.values.tolist() == [3.0]
    fits = [NeuKron(hidden_size=3).fit(x, epochs=2).predict(rows, cols) for x in formats[:2]]
    assert torch.equal(fits[0], fits[1])


def test_signed_inputs_need_the_signed_variant():
    seed = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64)
    matrix = planted_kronecker([seed, seed.abs() + 0.1, seed.flip(0)])
    with pytest.raises(ValueError, match="signed=True"):
        NeuKron(hidden_size=4).fit(matrix.to_sparse(), epochs=1)
    compressor = NeuKron(hidden_size=6, signed=True, dtype="float64").fit(matrix.to_sparse(), epochs=120, lr=0.05)
    assert compressor.approximation_error() < 0.05 * matrix.square().sum().item()
    signs = torch.sign(compressor.reconstruct()) == torch.sign(matrix)
    assert signs.float().mean() > 0.9


def test_clear_errors():
    x = torch.eye(4).to_sparse()
    with pytest.raises(TypeError, match="strided"):
        NeuKron(4).fit(torch.eye(4))
    with pytest.raises(TypeError, match="integers"):
        as_sparse_input((torch.tensor([[0.0], [1.0]]), torch.ones(1), (2, 2)))
    with pytest.raises(ValueError, match="out of range"):
        as_sparse_input((torch.tensor([[0], [5]]), torch.ones(1), (2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        as_sparse_input((torch.tensor([[0], [1]]), torch.tensor([float("nan")]), (2, 2)))
    with pytest.raises(ValueError, match="no non-zero"):
        as_sparse_input((torch.tensor([[0], [1]]), torch.zeros(1), (2, 2)))
    with pytest.raises(TypeError, match="expected"):
        as_sparse_input("matrix")
    with pytest.raises(ValueError, match="seed_shape"):
        NeuKron(4).fit(torch.ones(2, 2, 2).to_sparse())
    with pytest.raises(ValueError, match="cell"):
        NeuKron(4, cell="transformer")
    with pytest.raises(ValueError, match="hidden_size"):
        NeuKron(0)
    with pytest.raises(RuntimeError, match="not fitted"):
        NeuKron(4).predict([0], [0])
    with pytest.raises(ValueError, match="gamma"):
        NeuKron(4).fit(x, gamma=0.0)
    compressor = NeuKron(4).fit(x, epochs=0)
    with pytest.raises(ValueError, match="pass 2 index arrays"):
        compressor.predict([0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        compressor.predict([0], [4])
    with pytest.raises(ValueError, match="max_entries"):
        compressor.reconstruct(max_entries=8)
    with pytest.raises(ValueError, match="shape"):
        compressor.approximation_error(torch.eye(5).to_sparse())


def test_exported_as_kt_neukron():
    assert kt.neukron.NeuKron is NeuKron
