"""The row gathers (Kronecker rows, TT rows, TT bags) and the block-sparse linear as ``torch.library`` custom ops:
schema, fake tensors and autograd (``opcheck``), and ``torch.compile(fullgraph=True)`` tracing the ops where the
kernels apply, with forward and gradients equal to the PyTorch path.

On CPU the ops run their Triton kernels under ``TRITON_INTERPRET=1`` (tests/conftest.py); on a GPU machine
(``benchmarks/gpu_check.sh``) the same tests run on CUDA.
"""

from __future__ import annotations

import pytest
import torch


pytest.importorskip("triton")

from test_library_ops import graphs_of  # noqa: E402

from kron_transformers import BlockSparseLinear, KronEmbedding, TTEmbedding, TTEmbeddingBag  # noqa: E402
from kron_transformers.kernels import dispatch  # noqa: E402


OPS = torch.ops.kron_transformers
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IDS = torch.tensor([[3, 17, 3], [59, 0, 8]], device=DEVICE)
OFFSETS = torch.tensor([0, 2, 2, 5], device=DEVICE)  # an empty bag; the last runs to the end


def random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def tt_cores(ranks=(1, 3, 2, 1), shapes=((3, 2), (4, 3), (5, 2))):
    return [random(ranks[k], m, n, ranks[k + 1], seed=k) for k, (m, n) in enumerate(shapes)]


def test_opcheck_gather_ops():
    factors = [random(2, 6, 3, seed=1), random(2, 10, 4, seed=2)]
    torch.library.opcheck(OPS.kron_gather_rows.default, (IDS, factors, 11))
    torch.library.opcheck(OPS.kron_gather_rows_backward.default, (IDS, random(2, 3, 11), factors))
    cores = tt_cores()
    torch.library.opcheck(OPS.tt_gather_rows.default, (IDS, cores, 11))
    torch.library.opcheck(OPS.tt_gather_rows_backward.default, (IDS, random(2, 3, 11), cores))


@pytest.mark.parametrize("weighted, mean", [(True, False), (False, True)])
def test_opcheck_tt_embedding_bag_ops(weighted, mean):
    ids = IDS.reshape(-1)
    bounds = torch.cat([OFFSETS, torch.tensor([len(ids)], device=DEVICE)])
    weights = random(len(ids), seed=3) if weighted else None
    cores = tt_cores()
    torch.library.opcheck(OPS.tt_embedding_bag.default, (ids, bounds, weights, cores, 11, mean))
    arguments = (ids, bounds, weights, random(len(OFFSETS), 11, seed=4), cores, mean)
    torch.library.opcheck(OPS.tt_embedding_bag_backward.default, arguments)


def test_opcheck_block_sparse_matmul():
    values = random(3, 2, 4, seed=5)
    crow_indices, col_indices = torch.tensor([0, 1, 1, 3], device=DEVICE), torch.tensor([0, 0, 1], device=DEVICE)
    torch.library.opcheck(OPS.block_sparse_matmul.default, (random(2, 3, 8), values, crow_indices, col_indices, 6))


def block_sparse_layer():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], device=DEVICE).repeat_interleave(2, 0)
    mask = mask.repeat_interleave(4, 1)
    return BlockSparseLinear.from_dense(random(6, 8) * mask, (2, 4), random(6))


CASES = {
    "word2ketxs": (
        lambda: KronEmbedding(60, 10, rank=3, factor_shapes=[(3, 2), (4, 3), (5, 2)]),
        (IDS,),
        "kron_gather_rows",
    ),
    "tt_rows": (lambda: TTEmbedding(60, 10, num_cores=3, tt_ranks=3, init="glorot"), (IDS,), "tt_gather_rows"),
    "tt_bag_weighted": (
        lambda: TTEmbeddingBag(60, 10, tt_ranks=3, mode="sum", init="glorot"),
        (IDS.reshape(-1), OFFSETS, torch.rand(6, generator=torch.Generator().manual_seed(6)).to(DEVICE)),
        "tt_embedding_bag",
    ),
    "tt_bag_mean": (
        lambda: TTEmbeddingBag(60, 10, tt_ranks=3, mode="mean", init="glorot"),
        (IDS,),
        "tt_embedding_bag",
    ),
    "block_sparse": (block_sparse_layer, (random(3, 8, seed=7),), "block_sparse_matmul"),
}


def outputs_and_grads(module, output, inputs):
    """The output and the gradients of a weighted square loss w.r.t. the float inputs and the parameters."""
    leaves = [t for t in inputs if t.is_floating_point()] + list(module.parameters())
    loss = (output * torch.linspace(-1, 1, output.shape[-1], device=output.device)).square().sum()
    return [output, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_modules_call_the_custom_ops(name, monkeypatch):
    """``fullgraph=True`` (a graph break fails) with the kernels allowed: the graph holds the custom op, and the
    output and gradients equal the eager PyTorch path."""
    make_module, inputs, op = CASES[name]
    torch.manual_seed(0)
    module = make_module().to(DEVICE)
    inputs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    expected = outputs_and_grads(module, module(*inputs), inputs)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    output, graphs = graphs_of(module, *inputs)
    assert len(graphs) == 1 and f"kron_transformers.{op}" in graphs[0]
    for actual, wanted in zip(outputs_and_grads(module, output, inputs), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)


def test_aot_autograd_traces_the_backward_ops(monkeypatch):
    """Under AOTAutograd (``aot_eager``) the weighted TT bag's backward is the backward op plus the traced
    weights gradient; gradients equal the PyTorch path's."""
    make_module, inputs, _ = CASES["tt_bag_weighted"]
    module = make_module().to(DEVICE)
    inputs = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    expected = outputs_and_grads(module, module(*inputs), inputs)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for actual, wanted in zip(outputs_and_grads(module, compiled(*inputs), inputs), expected, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
