"""The fused Kronecker-sum linear as ``torch.library`` custom ops: schema, fake tensors, autograd, and
``torch.compile(fullgraph=True)`` tracing the op (not the PyTorch path) where the kernels apply.

On CPU the ops run their Triton kernels under ``TRITON_INTERPRET=1`` (tests/conftest.py); on a GPU machine
(``benchmarks/gpu_check.sh``) the same tests run on CUDA tensors, so the compiled graphs trace the real kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kron_transformers.kernels as kernels
from kron_transformers import KPDLinear, KronLinear
from kron_transformers.kernels import dispatch, library_ops, torch_ops


pytest.importorskip("triton")

KRON_LINEAR = torch.ops.kron_transformers.kron_linear.default
GRAD_FACTORS = torch.ops.kron_transformers.kron_linear_grad_factors.default
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def factors(rank=2, a1=3, b1=5, a2=4, b2=3, scale=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, a1, b1, generator=generator).to(DEVICE).requires_grad_()
    b = torch.randn(rank, a2, b2, generator=generator).to(DEVICE).requires_grad_()
    s = torch.randn(a1, b1, generator=generator).to(DEVICE).requires_grad_() if scale else None
    return a, b, s


@pytest.mark.parametrize("with_scale", [False, True])
def test_opcheck_schema_fake_and_autograd_registration(with_scale):
    a, b, s = factors(scale=with_scale)
    x = torch.randn(2, 3, 14, device=DEVICE, requires_grad=True)
    torch.library.opcheck(KRON_LINEAR, (x, a, b, s, 11, None, None))
    dy = torch.randn(6, 11, device=DEVICE)
    scale = s.detach() if s is not None else None
    torch.library.opcheck(GRAD_FACTORS, (x.detach().reshape(6, 14), dy, a.detach(), b.detach(), scale, None))


def test_fake_implementations_give_the_output_shapes():
    with FakeTensorMode():
        a, b = torch.empty(4, 300, 48, dtype=torch.bfloat16), torch.empty(4, 4, 4, dtype=torch.bfloat16)
        x = torch.empty(2, 7, 192, dtype=torch.bfloat16)
        y = KRON_LINEAR(x, a, b, None, 1200, None, None)
        grad_a, grad_b = GRAD_FACTORS(x, torch.empty(2, 7, 1200, dtype=torch.bfloat16), a, b, None, None)
    assert (y.shape, y.dtype) == ((2, 7, 1200), torch.bfloat16)
    assert (grad_a.shape, grad_a.dtype, grad_b.shape, grad_b.dtype) == (
        (4, 300, 48),
        torch.float32,
        (4, 4, 4),
        torch.float32,
    )


def graphs_of(function, *inputs):
    """Compile with ``fullgraph=True`` (a graph break fails), return the output and the Dynamo graphs' code."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    torch._dynamo.reset()
    output = torch.compile(function, fullgraph=True, backend=capture)(*inputs)
    return output, graphs


@pytest.mark.parametrize("make_layer", [
    lambda: KronLinear(15, 11, rank=2, factor_shapes=[(3, 5), (4, 3)]),
    lambda: KPDLinear(15, 12, rank=2, block_size=(4, 3)),
])  # fmt: skip
def test_compiled_layers_call_the_custom_op_when_the_kernels_apply(make_layer, monkeypatch):
    """With the kernels allowed (CUDA tensors; on CPU the interpreter with the backend forced) the compiled graph
    holds ``kron_transformers.kron_linear``, and forward and gradients equal the eager PyTorch path."""
    torch.manual_seed(0)
    layer = make_layer()
    if isinstance(layer, KPDLinear):
        with torch.no_grad():
            layer.factorization.s.normal_()
    layer = layer.to(DEVICE)
    x = torch.randn(4, 15, device=DEVICE, requires_grad=True)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    output, graphs = graphs_of(layer, x)
    assert len(graphs) == 1 and "kron_transformers.kron_linear" in graphs[0]
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(output.square().sum(), [x, *layer.parameters()])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_compiled_cpu_model_traces_the_pytorch_path_by_default(monkeypatch):
    """``auto`` on CPU tensors: the graph holds the PyTorch reference, not the custom op."""
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    layer = KronLinear(15, 11, rank=2, factor_shapes=[(3, 5), (4, 3)])
    x = torch.randn(4, 15)
    output, graphs = graphs_of(layer, x)
    assert len(graphs) == 1 and "kron_transformers" not in graphs[0]
    factorization = layer.factorization
    expected = torch_ops.kron_matmul(x, list(factorization.factors), factorization.rows) + layer.bias
    torch.testing.assert_close(output, expected)


def gather_factors():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, a, b, generator=generator) for a, b in [(3, 2), (2, 3)]]


def gather_rows(ids, *factors):
    return kernels.kron_gather_rows(ids, list(factors), 6)


@pytest.mark.parametrize("make_call, needs_grad, traces_the_op", [
    (lambda: (KronLinear(15, 11, rank=2, factor_shapes=[(3, 5), (4, 3)]), torch.randn(4, 15)), True, True),
    (lambda: (KPDLinear(15, 12, rank=2, block_size=(4, 3)), torch.randn(4, 15)), False, False),  # policy "never"
    (lambda: (gather_rows, torch.tensor([4, 0, 4]), *gather_factors()), True, False),  # "inference", training
    (lambda: (gather_rows, torch.tensor([4, 0, 4]), *gather_factors()), False, True),  # "inference", no gradient
])  # fmt: skip
def test_compiled_auto_follows_each_ops_policy(make_call, needs_grad, traces_the_op, monkeypatch):
    """``auto`` traces the custom op only where the op's ``auto`` policy (``kernels/ops.py``) runs its kernel in
    eager mode: not kpd_matmul's, and the row gather's only when nothing needs a gradient. On CPU the kernels are
    let run as on CUDA tensors (the interpreter)."""
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_compiled_kernels_on_cpu", lambda: True)
    torch.manual_seed(0)
    function, *inputs = make_call()
    if isinstance(function, torch.nn.Module):
        function = function.to(DEVICE).requires_grad_(needs_grad)
    inputs = [value.to(DEVICE) for value in inputs]
    inputs = [value.requires_grad_(needs_grad) if value.is_floating_point() else value for value in inputs]
    with torch.set_grad_enabled(needs_grad):
        _, graphs = graphs_of(function, *inputs)
    assert len(graphs) == 1 and ("kron_transformers." in graphs[0]) == traces_the_op, graphs[0]


def test_kron_linear_checks_its_arguments():
    a, b, _ = factors(scale=False)
    with pytest.raises(ValueError, match="kron_linear: input has 16 features but the factors take at most"):
        library_ops.kron_linear(torch.randn(1, 16, device=DEVICE), a, b, 6)
