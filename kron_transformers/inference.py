"""Inference mode: keep the dense weights of compressed layers between calls, within a memory budget.

In eval and generation the factors do not change, yet every call would rebuild ``W`` (or run the
structured product). ``prepare_for_inference`` turns on each factorization's inference cache
(``Factorization.inference_weight``): the first eval call stores ``materialize()``, later calls run one
dense GEMM or row gather on it. The stored matrix is keyed on the factors' version counters, data
pointers, dtype and device, so an optimizer step, ``load_state_dict`` or ``.to()`` is detected without
hooks and the matrix is rebuilt; ``train()`` and ``.to()`` free it; it is never used while gradients can
flow to the factors, nor inside ``torch.compile`` graphs.

The trade is memory: a cached layer holds its dense ``rows x cols`` matrix next to its factors, which
is what compression saved. Caching is therefore opt-in (never automatic under ``eval()`` +
``no_grad()``), and ``memory_budget`` caps the bytes held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .factorizations import Factorization
from .modules.bag import FactorizedEmbeddingBag
from .modules.embedding import FactorizedEmbedding


CACHE_MODES = ("auto", "dense", "none")
# In "auto" a layer used only as a matmul is cached when its structured product needs at least this
# share of the dense product's multiply-adds: the small GEMMs of a structured product run well below the
# large-GEMM rate, so fewer than half the multiply-adds is where the structured product starts to win.
STRUCTURED_SHARE_WORTH_CACHING = 0.5


@dataclass
class InferencePlan:
    """What ``prepare_for_inference`` cached: module names and bytes, and what it left factored and why."""

    cached: dict[str, int] = field(default_factory=dict)
    uncached: dict[str, str] = field(default_factory=dict)

    @property
    def cached_bytes(self) -> int:
        return sum(self.cached.values())


def _dense_bytes(factorization: Factorization) -> int:
    element = next((p for p in factorization.parameters() if p.is_floating_point()), None)
    return factorization.rows * factorization.cols * (element.element_size() if element is not None else 4)


def _worth_caching(factorization: Factorization, gathered: bool) -> float:
    """How much the cache saves per row, relative to the dense product (0: it does not pay)."""
    if gathered:  # reading a stored row never costs more than rebuilding it
        return float("inf")
    share = factorization.matmul_flops_per_row() / (factorization.rows * factorization.cols)
    return share if share >= STRUCTURED_SHARE_WORTH_CACHING else 0.0


def prepare_for_inference(model: nn.Module, cache: str = "auto", memory_budget: int | None = None) -> InferencePlan:
    """Put ``model`` in eval mode and turn the dense-weight cache of its compressed layers on or off.

    ``cache``: ``"auto"`` caches the layers where a stored ``W`` is faster than the structured product
    (every embedding and tied head gather or table; matmuls whose structured product is not much
    cheaper than the dense one, e.g. not a low-rank ``U V`` of small rank), most valuable first, while
    ``memory_budget`` (bytes; ``None``: no cap) allows; ``"dense"`` caches every layer and raises if
    that exceeds ``memory_budget``; ``"none"`` turns caching off (each call rebuilds or runs the faster
    path the cost model picks). A factorization shared by several modules (a tied head) is cached once.
    Returns the ``InferencePlan``. ``model.train()`` frees the caches; they refill on the next eval call.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"prepare_for_inference: cache must be one of {CACHE_MODES}, got {cache!r}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 0):
        raise ValueError(f"prepare_for_inference: memory_budget must be a number of bytes >= 0, got {memory_budget!r}")
    names: dict[int, str] = {}
    factorizations: dict[int, Factorization] = {}
    gathered: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, Factorization):
            factorizations.setdefault(id(module), module)
            names.setdefault(id(module), name.removesuffix(".factorization"))
        if isinstance(module, (FactorizedEmbedding, FactorizedEmbeddingBag)):
            gathered.add(id(module.factorization))
    plan = InferencePlan()
    chosen: list[Factorization] = []
    if cache == "dense":
        chosen = list(factorizations.values())
        total = sum(_dense_bytes(f) for f in chosen)
        if memory_budget is not None and total > memory_budget:
            raise ValueError(
                f"prepare_for_inference: caching every compressed layer of {type(model).__name__} needs {total} "
                f"bytes, over memory_budget={memory_budget}; use cache='auto' to cache what fits"
            )
    elif cache == "auto":
        value = {key: _worth_caching(f, key in gathered) for key, f in factorizations.items()}
        budget_left = memory_budget
        for key in sorted(factorizations, key=lambda k: -value[k]):
            size = _dense_bytes(factorizations[key])
            if value[key] == 0.0:
                plan.uncached[names[key]] = "its structured product is cheaper than the dense one"
            elif budget_left is not None and size > budget_left:
                plan.uncached[names[key]] = f"over the memory budget ({size} bytes, {budget_left} left)"
            else:
                chosen.append(factorizations[key])
                budget_left = None if budget_left is None else budget_left - size
    chosen_ids = {id(f) for f in chosen}
    for key, factorization in factorizations.items():
        factorization.inference_cache_enabled = key in chosen_ids
        factorization.drop_inference_cache()
        if key in chosen_ids:
            plan.cached[names[key]] = _dense_bytes(factorization)
        elif cache == "none":
            plan.uncached[names[key]] = "cache='none'"
    model.eval()
    return plan
