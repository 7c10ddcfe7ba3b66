"""Backend selection (``KRON_TRANSFORMERS_BACKEND``), fallbacks and ``torch.compile`` on the dispatched ops."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import KERNEL_DEVICE

import kron_transformers.kernels as kernels
from kron_transformers import (
    BlockSparseLinear,
    KPDLinear,
    KronEmbedding,
    KronLinear,
    TiedFactorizedHead,
    TTEmbedding,
    TTEmbeddingBag,
)
from kron_transformers.factorizations.kronecker import factored_is_cheaper
from kron_transformers.kernels import dispatch, torch_ops
from kron_transformers.kernels import ops as kernel_ops


@pytest.fixture
def backend(monkeypatch):
    def set_backend(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
        else:
            monkeypatch.setenv(dispatch.BACKEND_ENV, value)

    monkeypatch.setattr(dispatch, "_warned_fallbacks", set())
    return set_backend


@pytest.fixture
def triton_calls(monkeypatch):
    """Names of the Triton implementations run (each call recorded), with the real kernel still running."""
    pytest.importorskip("triton")
    calls = []
    loader = dispatch._load

    def recording_load(triton_impl):
        function = loader(triton_impl)

        def recorded(*args, **kwargs):
            calls.append(triton_impl)
            return function(*args, **kwargs)

        return recorded

    monkeypatch.setattr(dispatch, "_load", recording_load)
    return calls


def kron_args(seed=0, order=2, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (2, 3)] if order == 2 else [(2, 2), (2, 1), (1, 3)]
    factors = [torch.randn(2, a, b, generator=generator, dtype=dtype).to(device) for a, b in shapes]
    cols = 6
    return torch.randn(4, cols, generator=generator, dtype=dtype).to(device), factors


def test_auto_picks_torch_for_cpu_tensors(backend):
    backend(None)
    assert dispatch.selected_backend(torch.zeros(2), [torch.zeros(1)]) == "torch"


def test_env_forces_each_backend_and_rejects_unknown_values(backend):
    backend("torch")
    assert dispatch.selected_backend(torch.zeros(2)) == "torch"
    backend("TRITON")
    if dispatch.triton_available():
        assert dispatch.selected_backend(torch.zeros(2)) == "triton"
    backend("cuda")
    with pytest.raises(ValueError, match="KRON_TRANSFORMERS_BACKEND must be one of"):
        dispatch.selected_backend(torch.zeros(2))


def test_forced_triton_without_triton_is_a_clear_error(backend, monkeypatch):
    backend("triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    x, factors = kron_args()
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels.kron_matmul(x, factors, 6)


def test_forced_triton_runs_the_kernel_and_matches_torch(backend, triton_calls):
    x, factors = kron_args(seed=1, device=KERNEL_DEVICE)
    backend("torch")
    expected = kernels.kron_matmul(x, factors, 5)
    assert triton_calls == []
    backend("triton")
    torch.testing.assert_close(kernels.kron_matmul(x, factors, 5), expected, rtol=1e-5, atol=1e-5)
    assert triton_calls == ["library_ops:kron_matmul"]


def test_forced_triton_on_uncovered_arguments_falls_back_with_one_warning(backend, triton_calls):
    backend("triton")
    x, factors = kron_args(seed=2, order=3)  # order 3: the fused kernel is order 2 only
    with pytest.warns(UserWarning, match="kron_matmul: .* does not cover these arguments"):
        output = kernels.kron_matmul(x, factors, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.kron_matmul(x, factors, 4)  # warned once only
    torch.testing.assert_close(output, torch_ops.kron_matmul(x, factors, 4))
    assert triton_calls == []


def test_forced_triton_on_cpu_tensors_without_the_interpreter_falls_back(backend, triton_calls, monkeypatch):
    backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, factors = kron_args(seed=4)
    with pytest.warns(UserWarning, match="devices \\['cpu'\\]\\); using the PyTorch path"):
        output = kernels.kron_matmul(x, factors, 6)
    torch.testing.assert_close(output, torch_ops.kron_matmul(x, factors, 6))
    assert triton_calls == []


def test_forced_torch_never_runs_triton(backend, triton_calls):
    backend("torch")
    x, factors = kron_args(seed=3)
    kernels.kron_matmul(x, factors, 6)
    assert triton_calls == []


def test_layers_go_through_the_fused_kernels_when_forced(backend, triton_calls):
    """KronLinear (factored path), KPDLinear (S folded in) forward and backward equal the PyTorch path."""
    torch.manual_seed(0)
    layers = [KronLinear(12, 10, rank=2, factor_shapes=[(2, 3), (5, 4)]), KPDLinear(12, 10, rank=2, block_size=(5, 3))]
    with torch.no_grad():
        layers[1].factorization.s.normal_()
    layers = [layer.to(KERNEL_DEVICE) for layer in layers]
    x = torch.randn(3, 12).to(KERNEL_DEVICE)
    for layer in layers:
        results = {}
        for name in ("torch", "triton"):
            backend(name)
            layer.zero_grad()
            output = layer(x)
            output.square().sum().backward()
            results[name] = [output] + [p.grad.clone() for p in layer.parameters()]
        for fused, reference in zip(results["triton"], results["torch"]):
            torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    assert triton_calls == ["library_ops:kron_matmul", "library_ops:kpd_matmul"]


def test_tied_head_logits_go_through_the_fused_kernel(backend, triton_calls):
    """Kernel 3: logits ``h E^T`` from an order-2 Kronecker table by the same fused op, table never formed."""
    torch.manual_seed(0)
    embedding = KronEmbedding(99, 12, rank=2, factor_shapes=[(11, 3), (9, 4)], padding_idx=1)
    head = TiedFactorizedHead(embedding).to(KERNEL_DEVICE)
    hidden = torch.randn(2, 3, 12).to(KERNEL_DEVICE).requires_grad_()
    assert factored_is_cheaper(hidden, list(embedding.factorization.factors), 99, 12)
    backend("triton")
    logits = head(hidden)
    expected = hidden.double() @ embedding.materialize().double().T
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[..., 1], torch.zeros(2, 3, device=KERNEL_DEVICE))
    grad = torch.autograd.grad(logits.sum(), hidden)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), hidden)[0], rtol=1e-5, atol=1e-5)
    assert triton_calls == ["library_ops:kron_matmul"]


def kernels_run(calls: list[str]) -> list[str]:
    """The Triton kernels among the recorded loads (the lazily imported ``covers`` predicates left out)."""
    return [name for name in calls if not name.endswith("_covers")]


def forward_and_grads(module, backend, name, *inputs):
    backend(name)
    module.zero_grad()
    output = module(*inputs)
    (output * torch.linspace(-1, 1, output.shape[-1], device=output.device)).square().sum().backward()
    return [output] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_embeddings_go_through_the_fused_gather_kernels_when_forced(backend, triton_calls):
    """Kernels 2 and 4: word2ketXS (order 3) and TT rows and TT bags, forward and gradients, equal the PyTorch path."""
    torch.manual_seed(0)
    ids = torch.tensor([[3, 17, 3, 0], [59, 17, 8, 3]])
    offsets = torch.tensor([0, 3, 3, 5])
    weights = torch.rand(8)
    cases = [
        (KronEmbedding(60, 10, rank=3, factor_shapes=[(3, 2), (4, 3), (5, 2)]), (ids,)),
        (TTEmbedding(60, 10, num_cores=3, tt_ranks=3, init="glorot"), (ids,)),
        (TTEmbeddingBag(60, 10, tt_ranks=3, mode="sum", init="glorot"), (ids.reshape(-1), offsets, weights)),
        (TTEmbeddingBag(60, 10, tt_ranks=3, mode="mean", init="glorot"), (ids,)),
    ]
    for module, inputs in cases:
        module, inputs = module.to(KERNEL_DEVICE), [tensor.to(KERNEL_DEVICE) for tensor in inputs]
        fused = forward_and_grads(module, backend, "triton", *inputs)
        reference = forward_and_grads(module, backend, "torch", *inputs)
        assert len(fused) == len(reference) > 1
        for fused_tensor, reference_tensor in zip(fused, reference):
            torch.testing.assert_close(fused_tensor, reference_tensor, rtol=1e-4, atol=1e-5)
    assert kernels_run(triton_calls) == [
        "triton_gather:kron_gather_rows_triton",
        "triton_tensor_train:tt_gather_rows_triton",
        "triton_tensor_train:tt_embedding_bag_triton",
        "triton_tensor_train:tt_embedding_bag_triton",
    ]


def test_block_sparse_linear_uses_the_kernel_forward_and_backward(backend, triton_calls):
    """Kernel 5: ``BlockSparseLinear`` skips zero blocks by the Triton kernel, for inference and training (the
    custom op's backward is PyTorch's block products); output and gradients equal the dense layer's."""
    torch.manual_seed(0)
    weight = torch.randn(6, 8) * torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).repeat_interleave(
        2, 0
    ).repeat_interleave(4, 1)
    module = BlockSparseLinear.from_dense(weight, (2, 4), torch.randn(6)).to(KERNEL_DEVICE)
    weight = weight.to(KERNEL_DEVICE)
    x = torch.randn(3, 8).to(KERNEL_DEVICE).requires_grad_()
    expected = x @ weight.T + module.bias
    backend("triton")
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    assert triton_calls == ["library_ops:block_sparse_matmul"]
    output = module(x)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(3, 6).to(KERNEL_DEVICE)
    torch.testing.assert_close(torch.autograd.grad(output, x, grad)[0], grad @ weight, rtol=1e-5, atol=1e-5)
    values = module.values.clone().requires_grad_()
    arguments = (x, values, module.crow_indices, module.col_indices, 6)
    fused_grads = torch.autograd.grad(kernel_ops.block_sparse_matmul(*arguments), [x, values], grad)
    backend("torch")
    reference_grads = torch.autograd.grad(kernel_ops.block_sparse_matmul(*arguments), [x, values], grad)
    for fused, reference in zip(fused_grads, reference_grads):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert len(triton_calls) == 3


def test_auto_runs_each_kernel_where_it_measured_faster(backend, triton_calls, monkeypatch):
    """On CUDA arguments ``auto`` runs kron_matmul's kernel, never kpd_matmul's, and the row gathers' only when no
    argument needs a gradient (``ops.py``: their backward measured slower than PyTorch's on an H200)."""
    backend(None)
    monkeypatch.setattr(dispatch, "selected_backend", lambda *tensors: "triton")  # what CUDA arguments get
    x, factors = kron_args(seed=5, device=KERNEL_DEVICE)
    kernels.kron_matmul(x, factors, 5)
    assert kernels_run(triton_calls) == ["library_ops:kron_matmul"]
    scale, a, b = (torch.randn(*shape).to(KERNEL_DEVICE) for shape in [(6, 5), (2, 6, 5), (2, 1, 1)])
    torch.testing.assert_close(
        kernels.kpd_matmul(x[:, :5], scale, a, b, 6), torch_ops.kpd_matmul(x[:, :5], scale, a, b, 6)
    )
    assert kernels_run(triton_calls) == ["library_ops:kron_matmul"]
    ids = torch.tensor([4, 0, 4]).to(KERNEL_DEVICE)
    table = [factor.clone().requires_grad_() for factor in factors]
    kernels.kron_gather_rows(ids, table, 6)  # the factors need gradients: PyTorch
    assert kernels_run(triton_calls) == ["library_ops:kron_matmul"]
    with torch.no_grad():
        kernels.kron_gather_rows(ids, table, 6)
    kernels.tt_gather_rows(
        ids, [torch.randn(1, 3, 2, 2).to(KERNEL_DEVICE), torch.randn(2, 3, 3, 1).to(KERNEL_DEVICE)], 6
    )
    assert kernels_run(triton_calls)[1:] == [
        "triton_gather:kron_gather_rows_triton",
        "triton_tensor_train:tt_gather_rows_triton",
    ]
    backend("triton")  # forcing the backend runs every kernel regardless of its policy
    kernels.kpd_matmul(x[:, :5], scale, a, b, 6)
    assert kernels_run(triton_calls)[-1] == "library_ops:kpd_matmul"


def test_register_kernel_adds_one_dispatched_op(backend, monkeypatch):
    ops = {"kron_matmul", "kpd_matmul", "kron_gather_rows", "block_sparse_matmul", "tt_gather_rows"}
    ops.add("tt_embedding_bag")
    assert ops <= set(dispatch.KERNELS)
    monkeypatch.setattr(dispatch, "KERNELS", dict(dispatch.KERNELS))
    doubled = dispatch.register_kernel("double", lambda x: 2 * x, "library_ops:kron_matmul", lambda x: False)
    assert dispatch.KERNELS["double"].triton_impl == "library_ops:kron_matmul"
    backend(None)
    torch.testing.assert_close(doubled(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="kernel 'half': auto must be one of"):
        dispatch.register_kernel("half", lambda x: x / 2, "library_ops:kron_matmul", auto="sometimes")


@pytest.mark.parametrize("env", [None, "triton"])
def test_compile_fullgraph_has_no_graph_break(backend, env):
    """No graph break under ``torch.compile``: ``auto`` on CPU traces the PyTorch path; ``triton`` (interpreted here)
    traces the ``kron_transformers::kron_linear`` custom op (``tests/test_library_ops.py`` checks which)."""
    backend(env)
    torch.manual_seed(0)
    layer = KronLinear(64, 63, rank=2, factor_shapes=[(8, 8), (8, 8)])
    x = torch.randn(3, 64)
    assert factored_is_cheaper(x, list(layer.factorization.factors), 63, 64)  # the dispatched kron_matmul is traced
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x) if env is None else torch_ops_layer(layer, x))


def torch_ops_layer(layer: KronLinear, x: torch.Tensor) -> torch.Tensor:
    factorization = layer.factorization
    return torch_ops.kron_matmul(x, list(factorization.factors), factorization.rows) + layer.bias
