"""The read-only dense ``weight`` every compressed module exposes, as a lazy view."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch


class DenseWeightView:
    """``module.materialize()`` on demand: metadata probes are free, any use of the values builds the matrix.

    HF code reads ``.weight`` for dtype/device probes on every call (T5's feed-forward checks
    ``isinstance(self.wo.weight, torch.Tensor)`` and ``self.wo.weight.dtype``), for init functions
    (GPT-2's ``_init_weights`` reaches into ``c_proj.weight``) and sometimes for its values. So
    ``dtype``, ``device``, ``shape``, ``size()``, ``dim()``, ``numel()`` and ``requires_grad`` come from the
    module without building anything; ``isinstance(view, torch.Tensor)`` holds; torch functions and
    operators (``F.linear(x, view)``, ``x @ view.T``, ``view[ids]``), ``.data``, ``.detach()``, ``.to()`` and
    every other tensor attribute act on a fresh ``module.materialize()`` (never the inference cache, so
    an in-place init on it cannot corrupt the cache), with gradients flowing to the factors. There is no
    setter: assigning a Parameter to ``weight`` raises instead of silently replacing the factors.
    """

    __slots__ = ("_module", "_shape")

    def __init__(self, module: torch.nn.Module, shape: tuple[int, ...]) -> None:
        self._module = module
        self._shape = torch.Size(shape)

    @property
    def __class__(self):  # noqa: D105 (isinstance(view, torch.Tensor) holds, as for the dense weight it stands for)
        return torch.Tensor

    def materialize(self) -> torch.Tensor:
        """The dense values (one ``module.materialize()`` call)."""
        return self._module.materialize()

    def _first_floating(self) -> torch.Tensor:
        for tensor in (*self._module.parameters(), *self._module.buffers()):
            if tensor.is_floating_point():
                return tensor
        raise RuntimeError(f"{type(self._module).__name__} has no floating-point parameter to take a dtype from")

    @property
    def dtype(self) -> torch.dtype:
        return self._first_floating().dtype

    @property
    def device(self) -> torch.device:
        return self._first_floating().device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def requires_grad(self) -> bool:
        return any(p.requires_grad for p in self._module.parameters())

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self._shape if dim is None else self._shape[dim]

    def dim(self) -> int:
        return len(self._shape)

    def numel(self) -> int:
        return self._shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def data(self) -> torch.Tensor:
        return self.materialize().detach()

    def __getattr__(self, name: str):
        if name.startswith("_"):  # private probes (``_is_param``, ...) never build the matrix
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(value):
            if type(value) is DenseWeightView:
                return value.materialize()
            if isinstance(value, (list, tuple)):
                return type(value)(unwrap(item) for item in value)
            return value

        return func(*unwrap(args), **{key: unwrap(value) for key, value in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"DenseWeightView(shape={tuple(self._shape)}, dtype={self.dtype}, of {type(self._module).__name__})"

    def __len__(self) -> int:
        return self._shape[0]


def _delegate(name: str, reflected: bool = False) -> Callable:
    function = getattr(operator, name.strip("_").removeprefix("r") if reflected else name.strip("_"), None)

    def method(self, *args):
        values = self.materialize()
        if reflected:
            return function(args[0], values)
        return getattr(values, name)(*args) if function is None else function(values, *args)

    method.__name__ = name
    return method


for _name in (
    "__add__",
    "__sub__",
    "__mul__",
    "__truediv__",
    "__matmul__",
    "__pow__",
    "__getitem__",
    "__neg__",
    "__abs__",
    "__eq__",
    "__ne__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__iter__",
    "__array__",
):
    setattr(DenseWeightView, _name, _delegate(_name))
for _name in ("__radd__", "__rsub__", "__rmul__", "__rtruediv__", "__rmatmul__"):
    setattr(DenseWeightView, _name, _delegate(_name, reflected=True))
DenseWeightView.__hash__ = object.__hash__


def dense_weight_property(shape: Callable[[torch.nn.Module], tuple[int, ...]]) -> property:
    """A read-only ``weight`` property: a ``DenseWeightView`` of ``module.materialize()``, shape ``shape(module)``."""
    return property(
        lambda module: DenseWeightView(module, shape(module)),
        doc="Dense weight: a lazy read-only view, built from the factors when its values are used.",
    )
