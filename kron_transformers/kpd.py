"""Training KPD layers to block sparsity, choosing the block size, exporting block-sparse weights (Zhu et al.).

- ``l1_penalty`` (eq. 4) and ``proximal_step``: plain Adam + l1 never reaches exact zeros, so after each
  optimizer step ``S`` is soft-thresholded, ``S <- sign(S) max(|S| - t, 0)`` (the proximal operator of
  ``strength * ||S||_1``; with Adam's optimizer passed, ``t`` is per entry in Adam's metric);
  ``threshold_and_freeze`` pins small entries at zero for good.
- ``optimal_factor_shapes``: eq. 5, the parameter-minimal ``(m1, n1), (m2, n2)``.
- Pattern selection (section 5, eq. 7): ``KPD(block_sizes=[...])`` layers hold one KPD term per block
  size; ``pattern_proximal_step`` applies the proximal operator of
  ``lambda1 sum_k sqrt(sum_l ||S^(l,k)||_F^2) + lambda2 sum_k sum_l ||S^(l,k)||_1`` (soft-threshold, then
  shrink each pattern's group), ``PatternSelection`` raises both lambdas on the paper's schedule, and
  ``finalize_patterns`` keeps the surviving pattern.
- ``to_block_sparse``: inference modules holding only the non-zero blocks; ``layer_report`` counts
  sparsity, training parameters, training FLOPs (Proposition 2) and inference non-zeros.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from .config import optimal_kpd_block
from .factorizations import KPDFactorization, KPDPatternFactorization
from .modules import BlockSparseLinear, FactorizedLinear
from .surgery import KIND_BLOCK_SPARSE, applied_config, mark_compressed, set_module


def kpd_factorizations(model: nn.Module) -> dict[str, KPDFactorization]:
    """Every KPD term of the model by name, including the terms inside pattern-selection layers."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, KPDFactorization):
            found[name] = module
    return found


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum_l ||S^[l]||_1`` over all KPD layers (Zhu et al., eq. 4); multiply by lambda and add to the loss."""
    terms = [factorization.s.abs().sum() for factorization in kpd_factorizations(model).values()]
    if not terms:
        raise ValueError("l1_penalty: the model has no KPD layers (compress it with kt.KPD first)")
    return torch.stack(terms).sum()


@torch.no_grad()
def proximal_step(
    model: nn.Module, lr: float, strength: float, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Soft-threshold every ``S``: the proximal step of ``strength * ||S||_1`` (eq. 4's l1 term) after a step.

    ``S <- sign(S) max(|S| - t, 0)`` with ``t = lr * strength`` (the proximal gradient step of SGD). Pass the
    ``optimizer`` when it is Adam or AdamW: the threshold is then per entry, ``t = lr * strength / (sqrt(v_hat) +
    eps)`` with Adam's bias-corrected second moment ``v_hat``, the proximal operator in the metric Adam steps in
    (proximal Adam; Yun et al., NeurIPS 2021). Its fixed points are eq. 4's stationary points: an entry stays at 0
    exactly when ``|dJ/dS| <= strength``, so ``strength`` is eq. 4's lambda. With the plain threshold after an Adam
    step, every entry moves by about ``lr`` whatever its gradient, and nothing reaches 0 unless ``strength``
    nears 1. Call after ``optimizer.step()``; frozen entries (``threshold_and_freeze``) stay at 0.
    """
    factorizations = kpd_factorizations(model)
    if optimizer is not None:
        step_sizes = _adam_step_sizes(optimizer, {name: f.s for name, f in factorizations.items()})
    for name, factorization in factorizations.items():
        s = factorization.s
        if optimizer is None:
            threshold = lr * strength
        elif step_sizes[name] is None:
            continue  # the optimizer has not stepped this S yet (no gradient so far)
        else:
            threshold = lr * strength * step_sizes[name]
        s.copy_(torch.sign(s) * (s.abs() - threshold).clamp_min(0))
        _apply_freeze_mask(factorization)


def _adam_step_sizes(
    optimizer: torch.optim.Optimizer, parameters: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor | None]:
    """Per named parameter, Adam's ``1 / (sqrt(v_hat) + eps)`` (its step: ``lr m_hat`` times it); None if unstepped."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the real one
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or any(
        g.get("amsgrad") for g in inner.param_groups
    ):
        raise TypeError(
            f"proximal_step: optimizer= needs torch.optim.Adam or AdamW without amsgrad, got {type(inner).__name__}; "
            "for other optimizers call it without optimizer= (threshold lr * strength)"
        )
    groups = {id(p): group for group in inner.param_groups for p in group["params"]}
    sizes: dict[str, torch.Tensor | None] = {}
    for name, p in parameters.items():
        if id(p) not in groups:
            raise ValueError(
                f"proximal_step: {name}.s is not among the optimizer's parameters; pass the optimizer that trains "
                "the model"
            )
        state, (_, beta2), eps = inner.state.get(p), groups[id(p)]["betas"], groups[id(p)]["eps"]
        sizes[name] = None
        if state and "exp_avg_sq" in state:
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
            sizes[name] = 1 / (v_hat.sqrt() + eps)
    return sizes


def _apply_freeze_mask(factorization: KPDFactorization) -> None:
    mask = getattr(factorization, "s_frozen_zero", None)
    if mask is not None:
        factorization.s.masked_fill_(mask, 0.0)


@torch.no_grad()
def threshold_and_freeze(model: nn.Module, threshold: float) -> int:
    """Zero every ``|S| < threshold`` and keep those entries at zero (their gradient is masked too).

    Returns the number of frozen entries. The mask is a non-persistent buffer: a saved checkpoint
    holds the zeros themselves.
    """
    frozen = 0
    for factorization in kpd_factorizations(model).values():
        mask = factorization.s.abs() < threshold
        previous = getattr(factorization, "s_frozen_zero", None)
        if previous is not None:
            mask |= previous
        else:
            factorization.s.register_hook(lambda grad, f=factorization: grad.masked_fill(f.s_frozen_zero, 0.0))
        factorization.register_buffer("s_frozen_zero", mask, persistent=False)
        _apply_freeze_mask(factorization)
        frozen += int(mask.sum())
    return frozen


def sparsity(model: nn.Module, tolerance: float = 0.0) -> dict[str, float]:
    """Fraction of blocks switched off per KPD term: entries of ``S`` with ``|S| <= tolerance`` (abs, not sign)."""
    return {name: _zero_fraction(f.s, tolerance) for name, f in kpd_factorizations(model).items()}


def _zero_fraction(s: torch.Tensor, tolerance: float = 0.0) -> float:
    return float((s.detach().abs() <= tolerance).float().mean())


def optimal_factor_shapes(m: int, n: int, rank: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Zhu et al., eq. 5: ``(m1, n1), (m2, n2)`` minimizing KPD parameters with ``m1 m2 = m``, ``n1 n2 = n``.

    For ``rank = 1`` the objective is eq. 5's ``2 m1 n1 + m2 n2``; for rank r it is ``(1 + r) m1 n1 + r m2 n2``.
    """
    m2, n2 = optimal_kpd_block(m, n, rank)
    return (m // m2, n // n2), (m2, n2)


# ------------------------------------------------------------------------------------------------ patterns


def _pattern_layers(model: nn.Module) -> dict[str, KPDPatternFactorization]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, KPDPatternFactorization)}
    if not found:
        raise ValueError("the model has no pattern-selection layers; use kt.KPD(block_sizes=[...], rank=...)")
    return found


def _group_norms(model: nn.Module) -> torch.Tensor:
    """``sqrt(sum_l ||S^(l,k)||_F^2)`` for each pattern ``k`` (all layers must share the candidate list)."""
    layers = list(_pattern_layers(model).values())
    counts = {len(layer.patterns) for layer in layers}
    if len(counts) != 1:
        raise ValueError(f"pattern-selection layers disagree on the number of patterns: {sorted(counts)}")
    squares = [torch.stack([layer.patterns[k].s.pow(2).sum() for layer in layers]).sum() for k in range(counts.pop())]
    return torch.stack(squares).sqrt()


def pattern_penalty(model: nn.Module, lambda1: float, lambda2: float) -> torch.Tensor:
    """Zhu et al., eq. 7's regularizer: ``lambda1 sum_k ||S^(.,k)||_group + lambda2 sum_k sum_l ||S^(l,k)||_1``."""
    l1 = torch.stack([p.s.abs().sum() for layer in _pattern_layers(model).values() for p in layer.patterns]).sum()
    return lambda1 * _group_norms(model).sum() + lambda2 * l1


@torch.no_grad()
def pattern_proximal_step(model: nn.Module, lr: float, lambda1: float, lambda2: float) -> None:
    """Proximal step of eq. 7's penalty (sparse group lasso): soft-threshold by ``lr lambda2``, then scale
    each pattern's group by ``max(0, 1 - lr lambda1 / ||group||)``; a dropped pattern becomes exactly 0."""
    layers = list(_pattern_layers(model).values())
    for layer in layers:
        for pattern in layer.patterns:
            pattern.s.copy_(torch.sign(pattern.s) * (pattern.s.abs() - lr * lambda2).clamp_min(0))
    for k, norm in enumerate(_group_norms(model)):
        scale = (1 - lr * lambda1 / norm).clamp_min(0) if norm > 0 else norm
        for layer in layers:
            layer.patterns[k].s.mul_(scale)


def surviving_patterns(model: nn.Module) -> list[int]:
    """Indices of the patterns whose ``S`` is not entirely zero across the model."""
    return [k for k, norm in enumerate(_group_norms(model).tolist()) if norm > 0]


@torch.no_grad()
def finalize_patterns(model: nn.Module) -> int:
    """Replace every pattern-selection layer by a ``KPDLinear`` of the surviving pattern; return its index.

    With several survivors the one with the largest group norm is kept (and the others dropped);
    the recorded structure is updated so the result saves and reloads as a plain KPD model.
    """
    norms = _group_norms(model)
    survivor = int(norms.argmax())
    config = applied_config(model)
    modules = copy.deepcopy(config.modules) if config is not None else {}
    for path, module in list(model.named_modules()):
        if isinstance(module, FactorizedLinear) and isinstance(module.factorization, KPDPatternFactorization):
            kept = module.factorization.patterns[survivor]
            replacement = FactorizedLinear.wrap(kept, module.bias is not None, module.weight_layout)
            if module.bias is not None:
                replacement.bias = module.bias
            replacement.train(module.training)
            set_module(model, path, replacement)
            if path in modules:
                modules[path]["structure"] = kept.structure()
    if config is not None:
        mark_compressed(model, dataclasses.replace(config, modules=modules))
    return survivor


@dataclass
class PatternSelection:
    """The paper's schedule (Zhu et al., section 6.1): start at ``lambda1 = lambda2 = 0.01`` and raise both
    by ``increment`` every ``every_epochs`` epochs; usable from any loop, or through ``KPDPatternCallback``.
    """

    lambda1: float = 0.01
    lambda2: float = 0.01
    increment: float = 0.002
    every_epochs: int = 5
    epochs_seen: int = 0

    def after_optimizer_step(self, model: nn.Module, lr: float) -> None:
        pattern_proximal_step(model, lr, self.lambda1, self.lambda2)

    def end_of_epoch(self, model: nn.Module) -> bool:
        """Advance the schedule; True once a single pattern survives (then call ``finalize_patterns``)."""
        self.epochs_seen += 1
        if self.epochs_seen % self.every_epochs == 0:
            self.lambda1 += self.increment
            self.lambda2 += self.increment
        return len(surviving_patterns(model)) <= 1


class KPDPatternCallback(TrainerCallback):
    """Runs ``PatternSelection`` inside ``transformers.Trainer``; stops training when one pattern is left."""

    def __init__(self, schedule: PatternSelection | None = None) -> None:
        self.schedule = schedule or PatternSelection()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.schedule.after_optimizer_step(model, optimizer.param_groups[0]["lr"])
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.schedule.end_of_epoch(model):
            control.should_training_stop = True
        return control


# ------------------------------------------------------------------------------------------------ export


@dataclass
class LayerReport:
    """Zhu et al.'s table columns for one KPD layer."""

    name: str
    block_size: tuple[int, int]
    sparsity: float
    training_parameters: int
    training_flops: int
    dense_flops: int
    inference_nonzeros: int


def training_flops(rows: int, cols: int, block_size: tuple[int, int], rank: int, batch: int = 1) -> int:
    """Forward + backward flops of a KPD layer, Zhu et al., Proposition 2 (``m x n`` weight, ``N = batch``)."""
    m, n, N, r = rows, cols, batch, rank
    m2, n2 = block_size
    m1, n1 = m // m2, n // n2
    forward = 2 * N * r * m1 * n1 * (m2 + n2) - N * r * (m + 2 * m2 * n1) + 3 * N * m
    grad_a = 2 * N * n1 * m2 * (n2 + m1) - N * n1 * m2 + m1 * n1
    grad_b = 2 * N * m1 * n2 * (m2 + n1) + m1 * n1 - N * n2 * m1
    grad_s = N * m + N * r * (4 * m1 * m2 * n1 - m2 * n1 + 2 * m2 * n1 * n2)
    return forward + r * (grad_a + grad_b) + grad_s


def dense_training_flops(rows: int, cols: int, batch: int = 1) -> int:
    """Proposition 2's dense counterpart: forward ``2(n+1)mN`` plus backward ``mN(2n+1)``."""
    return 2 * (cols + 1) * rows * batch + rows * batch * (2 * cols + 1)


def layer_report(model: nn.Module, batch: int = 1) -> list[LayerReport]:
    """Sparsity, training parameters, training FLOPs (per ``batch`` samples) and inference non-zeros per KPD layer."""
    reports = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear) and isinstance(module.factorization, KPDFactorization):
            factorization = module.factorization
            weight = factorization.materialize().detach()
            reports.append(
                LayerReport(
                    name=name,
                    block_size=factorization.block_size,
                    sparsity=_zero_fraction(factorization.s),
                    training_parameters=factorization.num_parameters(),
                    training_flops=training_flops(
                        weight.shape[0], weight.shape[1], factorization.block_size, factorization.rank, batch
                    ),
                    dense_flops=dense_training_flops(weight.shape[0], weight.shape[1], batch),
                    inference_nonzeros=BlockSparseLinear.from_dense(
                        weight, factorization.block_size, None
                    ).num_nonzeros(),
                )
            )
    return reports


@torch.no_grad()
def to_block_sparse(model: nn.Module) -> nn.Module:
    """Replace each ``KPDLinear`` by a ``BlockSparseLinear`` holding ``W = sum_i (S ⊙ A_i) ⊗ B_i``'s non-zero
    blocks (Zhu et al.: "during inference, our algorithm directly uses block-wise sparse matrices").

    Outputs are unchanged; the recorded structure is updated so the model saves and reloads.
    """
    config = applied_config(model)
    modules = copy.deepcopy(config.modules) if config is not None else {}
    replaced = 0
    for path, module in list(model.named_modules()):
        if isinstance(module, FactorizedLinear) and isinstance(module.factorization, KPDFactorization):
            factorization = module.factorization
            weight = factorization.materialize()
            sparse = BlockSparseLinear.from_dense(weight, factorization.block_size, module.bias, module.weight_layout)
            sparse.train(module.training)
            set_module(model, path, sparse)
            replaced += 1
            if path in modules:
                modules[path]["kind"] = KIND_BLOCK_SPARSE
                modules[path]["structure"] = {
                    "block_size": list(factorization.block_size),
                    "nonzero_blocks": int(sparse.values.shape[0]),
                }
    if not replaced:
        raise ValueError("to_block_sparse: the model has no KPD layers (finalize pattern selection first)")
    if config is not None:
        mark_compressed(model, dataclasses.replace(config, modules=modules))
    return model


def inference_nonzeros(model: nn.Module) -> int:
    """Stored weight entries of all block-sparse layers (a proxy for inference memory and FLOPs)."""
    return sum(m.num_nonzeros() for m in model.modules() if isinstance(m, BlockSparseLinear))


__all__ = [
    "KPDPatternCallback",
    "LayerReport",
    "PatternSelection",
    "dense_training_flops",
    "finalize_patterns",
    "inference_nonzeros",
    "kpd_factorizations",
    "l1_penalty",
    "layer_report",
    "optimal_factor_shapes",
    "pattern_penalty",
    "pattern_proximal_step",
    "proximal_step",
    "sparsity",
    "surviving_patterns",
    "threshold_and_freeze",
    "to_block_sparse",
    "training_flops",
]
