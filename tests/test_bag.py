"""``embedding_bag_lookup`` against ``nn.EmbeddingBag`` on the materialized table, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from kron_transformers.modules.bag import embedding_bag_lookup


VOCAB, DIM = 23, 5
CASES = [
    # (name, input, offsets, per_sample_weights?, mode, padding_idx, include_last_offset)
    ("1d sum", [3, 3, 7, 0, 22, 3], [0, 2, 2, 5], False, "sum", None, False),
    ("1d mean", [3, 3, 7, 0, 22, 3], [0, 2, 2, 5], False, "mean", None, False),
    ("1d max", [3, 3, 7, 0, 22, 3], [0, 3, 4], False, "max", None, False),
    ("weighted", [3, 3, 7, 0, 22, 3], [0, 2, 5], True, "sum", None, False),
    ("padding mean", [4, 3, 4, 4, 9, 4], [0, 2, 4], False, "mean", 4, False),
    ("padding sum weighted", [4, 3, 4, 4, 9, 4], [0, 2, 4], True, "sum", 4, False),
    ("last offset", [1, 2, 3, 4, 5], [0, 2, 5], False, "mean", None, True),
    ("2d", [[1, 2, 2], [5, 5, 5], [22, 0, 1], [7, 8, 9]], None, False, "mean", None, False),
    ("2d padding", [[1, 2, 2], [4, 4, 4], [22, 4, 1], [7, 8, 9]], None, False, "sum", 4, False),
    ("empty", [], [0, 0], False, "sum", None, False),
    ("empty padding", [], [0], False, "mean", 4, False),
]


@pytest.mark.parametrize(("name", "ids", "offsets", "weighted", "mode", "padding_idx", "last"), CASES)
def test_lookup_matches_embedding_bag_on_the_dense_table(name, ids, offsets, weighted, mode, padding_idx, last):
    torch.manual_seed(0)
    table = torch.randn(VOCAB, DIM, dtype=torch.float64, requires_grad=True)
    input = torch.tensor(ids, dtype=torch.long)
    offsets = None if offsets is None else torch.tensor(offsets)
    weights = torch.rand(input.shape, dtype=torch.float64, requires_grad=True) if weighted else None
    calls = []

    def gather_rows(unique_ids):
        calls.append(unique_ids)
        return table[unique_ids]

    ours = embedding_bag_lookup(
        gather_rows, DIM, input, offsets, weights, mode=mode, padding_idx=padding_idx, include_last_offset=last
    )
    reference_table = table.detach().clone().requires_grad_()
    reference_weights = None if weights is None else weights.detach().clone().requires_grad_()
    reference = F.embedding_bag(
        input,
        reference_table,
        offsets,
        mode=mode,
        per_sample_weights=reference_weights,
        padding_idx=padding_idx,
        include_last_offset=last,
    )
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert len(calls) == 1 and torch.equal(calls[0], torch.unique(input))
    if ours.numel():
        cotangent = torch.randn_like(ours)
        (ours * cotangent).sum().backward()
        (reference * cotangent).sum().backward()
        reference_grad = reference_table.grad if reference_table.grad is not None else torch.zeros_like(table)
        torch.testing.assert_close(table.grad if table.grad is not None else torch.zeros_like(table), reference_grad)
        if weighted:
            torch.testing.assert_close(weights.grad, reference_weights.grad)


@pytest.mark.parametrize(
    ("ids", "offsets", "weights", "mode", "error", "match"),
    [
        ([1, 2], None, None, "sum", ValueError, "needs offsets"),
        ([[1, 2]], [0], None, "sum", ValueError, "offsets must be None"),
        ([1, 2], [0], [0.5, 0.5], "mean", ValueError, "only supported with mode='sum'"),
        ([1, 2], [0], [0.5], "sum", ValueError, "must match the input's shape"),
        ([1, 2], [0], None, "median", ValueError, "not one of"),
        ([[[1]]], None, None, "sum", ValueError, "must be 1-D with offsets or 2-D"),
    ],
)
def test_bad_arguments_name_the_module(ids, offsets, weights, mode, error, match):
    input = torch.tensor(ids)
    offsets = None if offsets is None else torch.tensor(offsets)
    weights = None if weights is None else torch.tensor(weights)
    with pytest.raises(error, match=f"MyBag: .*{match}"):
        embedding_bag_lookup(
            lambda ids: torch.zeros(len(ids), 2), 2, input, offsets, weights, mode=mode, module_name="MyBag"
        )


def test_float_ids_are_a_type_error():
    with pytest.raises(TypeError, match="int32/int64"):
        embedding_bag_lookup(lambda ids: torch.zeros(len(ids), 2), 2, torch.tensor([1.0]), torch.tensor([0]))
