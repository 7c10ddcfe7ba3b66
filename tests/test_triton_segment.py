"""Atomic-free segmented sums behind the embedding kernels' backward passes (interpreted on CPU; compiled on a GPU
machine, ``conftest.on_kernel_device``)."""

from __future__ import annotations

import pytest
import torch
from conftest import on_kernel_device


triton = pytest.importorskip("triton")

from kron_transformers.kernels import triton_segment  # noqa: E402
from kron_transformers.kernels.triton_segment import unique_slots  # noqa: E402


segment_sum = on_kernel_device(triton_segment.segment_sum)
reduce_by_digit = on_kernel_device(triton_segment.reduce_by_digit)


def test_unique_slots_match_torch_unique():
    ids = torch.tensor([5, 2, 9, 2, 2, 5, 0, 9, 2])
    slots = unique_slots(ids)
    values, counts = torch.unique(ids, return_counts=True)
    used = int(slots.num_unique)
    assert used == len(values) and slots.valid.tolist() == [True] * used + [False] * (len(ids) - used)
    assert torch.equal(slots.slot_ids[:used], values)
    assert torch.equal(slots.ends[:used] - slots.starts[:used], counts)
    assert torch.all(slots.ends[used:] <= slots.starts[used:])  # unused slots are empty
    for slot in range(used):
        positions = slots.order[slots.starts[slot] : slots.ends[slot]]
        assert torch.all(ids[positions] == values[slot])


@pytest.mark.parametrize("splits", [1, 3])
def test_segment_sum_with_scales_and_splits(splits):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(7, 37, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    row_index = torch.tensor([6, 0, 0, 3, 5, 1, 1, 1, 2, 4, 6])
    scale = torch.randn(len(row_index), generator=generator)
    starts, ends = torch.tensor([0, 2, 2, 9]), torch.tensor([2, 9, 2, 11])  # the third segment is empty
    out = segment_sum(source, row_index, starts, ends, scale=scale, splits=splits)
    expected = torch.stack(
        [(source[row_index[s:e]].double() * scale[s:e, None].double()).sum(0) for s, e in zip(starts, ends)]
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_reduce_by_digit_skips_invalid_slots():
    generator = torch.Generator().manual_seed(1)
    contributions = torch.randn(200, 6, generator=generator)
    digits = torch.randint(0, 3, (200,), generator=generator)
    valid = torch.arange(200) < 150
    expected = torch.zeros(4, 6, dtype=torch.float64).index_add_(0, digits[:150], contributions[:150].double())
    out = reduce_by_digit(contributions, digits, valid, 4)  # row 3 gets nothing
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
