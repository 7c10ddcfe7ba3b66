"""One table of ops with a PyTorch reference and an optional fused Triton kernel each.

``register_kernel`` returns the dispatched function the factorizations call. Per call the backend is:

- ``KRON_TRANSFORMERS_BACKEND=torch``: always the PyTorch reference;
- ``KRON_TRANSFORMERS_BACKEND=triton``: the Triton kernel (a clear error when Triton is not installed;
  arguments the kernel does not cover fall back to PyTorch with a one-time warning);
- ``auto`` (default): Triton when every tensor argument is on CUDA, Triton imports and the op's ``auto`` policy
  says so (``"always"``; ``"inference"``: only when no tensor argument needs a gradient; ``"never"``), PyTorch
  otherwise. The policies in ``ops.py`` follow the kernels measured against the PyTorch path on an H200
  (``benchmarks/backend_speed.py``, ``benchmarks/RESULTS.md``).

Under ``torch.compile`` an op registered with a ``compiled`` implementation (a ``torch.library`` custom op over
its Triton kernel, ``library_ops``) is traced as that opaque op when its tensors are on CUDA (or, under
``TRITON_INTERPRET=1`` with ``KRON_TRANSFORMERS_BACKEND=triton``, on CPU), the kernel covers them and, with
``auto``, the op's policy picks the kernel; otherwise the PyTorch reference is traced (Inductor generates its own
fused code). Either way the dispatcher causes no graph break.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


BACKEND_ENV = "KRON_TRANSFORMERS_BACKEND"
BACKENDS = ("auto", "torch", "triton")
AUTO_POLICIES = ("always", "inference", "never")


@dataclass(frozen=True)
class KernelEntry:
    """One op: its PyTorch reference, its Triton kernel (``"module:function"`` under ``kron_transformers.kernels``,
    imported on first use) and the predicate saying which arguments the kernel supports (a callable, or a
    ``"module:function"`` beside a kernel that needs Triton to import) and when ``auto`` picks the kernel on CUDA
    (one of ``AUTO_POLICIES``)."""

    name: str
    torch_impl: Callable[..., Any]
    triton_impl: str | None
    covers: Callable[..., bool] | str
    compiled: Callable[..., Any] | None = None
    auto: str = "always"

    def __post_init__(self) -> None:
        if self.auto not in AUTO_POLICIES:
            raise ValueError(f"kernel {self.name!r}: auto must be one of {AUTO_POLICIES}, got {self.auto!r}")

    def auto_picks_kernel(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``auto`` runs the kernel on these (CUDA) arguments: per ``auto``, and for ``"inference"`` only
        when no argument needs a gradient (the kernel's backward measured slower than PyTorch's)."""
        if self.auto == "inference":
            return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        return self.auto == "always"

    def kernel_covers(self, *args: Any, **kwargs: Any) -> bool:
        covers = _load(self.covers) if isinstance(self.covers, str) else self.covers
        return covers(*args, **kwargs)


KERNELS: dict[str, KernelEntry] = {}
_warned_fallbacks: set[str] = set()


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (cached)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter (used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The value of ``KRON_TRANSFORMERS_BACKEND`` (``auto`` when unset), validated."""
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    return backend


def _tensors(values: Any) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors(value))
    return found


def selected_backend(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for these tensor arguments (nested lists allowed), per the environment variable."""
    backend = requested_backend()
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{BACKEND_ENV}=triton but Triton is not installed; install it "
                f"(pip install 'kron_transformers[triton]') or set {BACKEND_ENV}=auto"
            )
        return "triton"
    found = _tensors(tensors)
    on_cuda = bool(found) and all(t.is_cuda for t in found)
    return "triton" if on_cuda and triton_available() else "torch"


@functools.cache
def _load(triton_impl: str) -> Callable[..., Any]:
    module_name, function_name = triton_impl.split(":")
    return getattr(importlib.import_module(f"kron_transformers.kernels.{module_name}"), function_name)


def _runnable_on_device(tensors: list[torch.Tensor]) -> bool:
    return all(t.is_cuda for t in tensors) or triton_interpreted()


@torch.compiler.assume_constant_result
def _compiled_kernels_allowed() -> bool:
    """Under ``torch.compile``: Triton imports and the backend is not forced to ``torch`` (read at trace time)."""
    return requested_backend() != "torch" and triton_available()


@torch.compiler.assume_constant_result
def _compiled_backend_forced() -> bool:
    """Under ``torch.compile``: ``KRON_TRANSFORMERS_BACKEND=triton`` (read at trace time), which overrides the
    ``auto`` policies."""
    return requested_backend() == "triton"


@torch.compiler.assume_constant_result
def _compiled_kernels_on_cpu() -> bool:
    """Under ``torch.compile``: CPU tensors may take the kernels (``TRITON_INTERPRET=1`` and the backend forced)."""
    return triton_interpreted() and _compiled_backend_forced()


def _compiled_call(entry: KernelEntry, args: tuple, kwargs: dict) -> Any:
    """The traced implementation: the custom op where it applies (with ``auto``, where the op's policy picks the
    kernel, as in eager mode), else the PyTorch reference."""
    tensors = _tensors((*args, *kwargs.values()))
    on_device = all(t.is_cuda for t in tensors) or _compiled_kernels_on_cpu()
    if (
        entry.compiled is not None
        and on_device
        and _compiled_kernels_allowed()
        and (_compiled_backend_forced() or entry.auto_picks_kernel(tensors))
        and entry.kernel_covers(*args, **kwargs)
    ):
        return entry.compiled(*args, **kwargs)
    return entry.torch_impl(*args, **kwargs)


def register_kernel(
    name: str,
    torch_impl: Callable[..., Any],
    triton_impl: str | None = None,
    covers: Callable[..., bool] | str | None = None,
    compiled: Callable[..., Any] | None = None,
    auto: str = "always",
) -> Callable[..., Any]:
    """Add op ``name`` to ``KERNELS`` and return its dispatched function (same signature as ``torch_impl``).

    ``triton_impl`` is ``"module:function"`` in ``kron_transformers.kernels`` (imported lazily, so Triton is
    only needed when it runs); ``covers(*args, **kwargs)`` says whether the kernel supports those arguments
    (default: all); like ``triton_impl`` it may be a lazily imported ``"module:function"``. ``compiled`` is what
    ``torch.compile`` traces instead of ``torch_impl`` where the kernel applies: a function calling ``torch.library``
    custom ops (importable without Triton); ``covers`` must then be a callable. ``auto`` says when the ``auto``
    backend runs the kernel on CUDA tensors (``AUTO_POLICIES``; forcing ``triton`` runs it regardless).
    Registering a name again replaces the entry.
    """
    entry = KernelEntry(
        name, torch_impl, triton_impl, covers if covers is not None else (lambda *a, **k: True), compiled, auto
    )
    KERNELS[name] = entry

    @functools.wraps(torch_impl)
    def dispatched(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return _compiled_call(entry, args, kwargs)
        if entry.triton_impl is None:
            return entry.torch_impl(*args, **kwargs)
        tensors = _tensors((*args, *kwargs.values()))
        if selected_backend(*tensors) == "torch" or (
            requested_backend() == "auto" and not entry.auto_picks_kernel(tensors)
        ):
            return entry.torch_impl(*args, **kwargs)
        if _runnable_on_device(tensors) and entry.kernel_covers(*args, **kwargs):
            return _load(entry.triton_impl)(*args, **kwargs)
        if requested_backend() == "triton" and name not in _warned_fallbacks:
            _warned_fallbacks.add(name)
            warnings.warn(
                f"{name}: {BACKEND_ENV}=triton but the Triton kernel does not cover these arguments "
                f"(shapes {[tuple(t.shape) for t in tensors]}, dtypes {sorted({str(t.dtype) for t in tensors})}, "
                f"devices {sorted({str(t.device) for t in tensors})}); using the PyTorch path",
                stacklevel=2,
            )
        return entry.torch_impl(*args, **kwargs)

    dispatched.kernel_entry = entry
    return dispatched
