"""``compress_model`` / ``decompress_model``: model surgery over any HF model (ARCHITECTURE.md layer 5).

Everything is validated and every replacement is built before the first module is swapped,
so a bad config raises with the model untouched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationStats, calibrate
from .config import EMBEDDING, LINEAR, KronConfig, MethodSpec
from .factorizations import build_factorization
from .factorizations.weighted import CALIBRATED_TIME_RATIO, row_weighted_error, weighted_error
from .matching import ALL_LINEAR, pattern_matches, rule_matches
from .modules import (
    COMPRESSED_MODULES,
    CONV1D_LAYOUT,
    LINEAR_LAYOUT,
    BlockSparseLinear,
    FactorizedEmbedding,
    FactorizedLinear,
    TiedFactorizedHead,
)
from .roles import (
    ATTENTION_ROLE,
    EMBEDDING_ROLE,
    FFN_ROLE,
    LM_HEAD_ROLE,
    ModelRoles,
    ModuleInfo,
    conv1d_class,
    detect_roles,
    is_conv1d,
    is_embedding,
    is_linear,
)


logger = logging.getLogger(__name__)

CONFIG_ATTRIBUTE = "quantization_config"
ORIGINAL_TIES_ATTRIBUTE = "_kron_original_tied_weights_keys"
ORIGINAL_IGNORE_ON_SAVE_ATTRIBUTE = "_kron_original_keys_to_ignore_on_save"

KIND_LINEAR = "linear"
KIND_EMBEDDING = "embedding"
KIND_TIED_HEAD = "tied_head"
KIND_BLOCK_SPARSE = "block_sparse"  # a KPD layer exported by kron_transformers.kpd.to_block_sparse

_COMPRESSION_LISTENERS: list[Callable[[nn.Module, KronConfig | None], None]] = []

ROLE_FIELDS = {EMBEDDING_ROLE: "embedding", ATTENTION_ROLE: "attention", FFN_ROLE: "ffn", LM_HEAD_ROLE: "lm_head"}


@dataclass
class _Plan:
    """One module to replace, fully resolved before anything is swapped."""

    info: ModuleInfo
    kind: str
    spec: MethodSpec | None
    structure: dict[str, Any] | None
    rows: int
    cols: int
    group: list[ModuleInfo] = field(default_factory=list)  # embeddings sharing the weight
    replacements: list[nn.Module] = field(default_factory=list)  # one per group member (or the module)
    init_error: float | None = None
    init_used: str | None = None  # "svd", "random", "calibrated", or "svd" with the reason calibrated was not
    output_error: float | None = None  # ||(W - W_hat) C^(1/2)|| / ||W C^(1/2)|| when calibration data was given
    output_error_start: float | None = None  # the same for the K-FAC start, before ALS refinement
    bias_shift: torch.Tensor | None = None  # (W - W_hat) mu, added to the bias by a calibrated init


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def _embed_scale(module: nn.Module, name: str) -> float | None:
    """The scale of transformers' scaled word embeddings, or None for a plain ``nn.Embedding``.

    Raises for embedding features a factorized table cannot honour (``max_norm`` renormalizes
    stored rows in place; ``sparse`` gradients; ``scale_grad_by_freq``).
    """
    for option, off in (("max_norm", None), ("sparse", False), ("scale_grad_by_freq", False)):
        if getattr(module, option, off) != off:
            raise ValueError(
                f"{name}: nn.Embedding({option}={getattr(module, option)!r}) is not supported by factorized "
                f"embeddings; set {option}={off!r} on the model or exclude {name!r}"
            )
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        if type(module).forward is not nn.Embedding.forward:
            raise ValueError(
                f"{name}: {type(module).__name__} overrides nn.Embedding.forward in a way kron_transformers cannot "
                f"reproduce; exclude it with exclude_modules=[{name!r}]"
            )
        return None
    return float(scale)


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """The dense weight in ``(rows, cols)`` orientation: ``(out, in)`` for linears, ``(vocab, dim)`` for embeddings."""
    return module.weight.T if is_conv1d(module) else module.weight


def _resolve_spec(info: ModuleInfo, config: KronConfig, roles: ModelRoles) -> MethodSpec | None:
    names = info.names
    if config.exclude_modules is not None and pattern_matches(config.exclude_modules, names, "exclude_modules"):
        return None
    for key, spec in config.rules.items():
        if rule_matches(key, names):
            return spec
    if config.target_modules is not None:
        if config.target_modules == ALL_LINEAR:
            targeted = is_linear(info.module) and info.module is not roles.output_embedding
        else:
            targeted = pattern_matches(config.target_modules, names, "target_modules")
        if not targeted:
            return None
    role_spec = getattr(config, ROLE_FIELDS[info.role]) if info.role in ROLE_FIELDS else None
    if role_spec is not None:
        return role_spec
    return config.default if config.target_modules is not None or info.role not in ROLE_FIELDS else None


def _warn_unmatched(config: KronConfig, infos: list[ModuleInfo]) -> None:
    """Warn for each pattern that matched no linear or embedding module."""
    all_names = [info.names for info in infos]
    checks: list[tuple[str, str | list[str]]] = []
    for field_name in ("target_modules", "exclude_modules"):
        value = getattr(config, field_name)
        if value is None or value == ALL_LINEAR:
            continue
        entries = [value] if isinstance(value, str) else [[entry] for entry in value]
        checks.extend((field_name, entry) for entry in entries)
    for field_name, entry in checks:
        if not any(pattern_matches(entry, names, field_name) for names in all_names):
            shown = entry if isinstance(entry, str) else entry[0]
            warnings.warn(f"KronConfig.{field_name}: {shown!r} matched no linear or embedding module", stacklevel=3)
    for key in config.rules:
        if not any(rule_matches(key, names) for names in all_names):
            warnings.warn(f"KronConfig.rules: {key!r} matched no linear or embedding module", stacklevel=3)


def _structure_parameters(structure: dict[str, Any], rows: int, cols: int) -> int:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        return build_factorization(structure, rows, cols).num_parameters()


def _warn_if_not_compressing(name: str, spec: MethodSpec, structure: dict[str, Any], rows: int, cols: int) -> None:
    """Warn (PEFT-like: the model still builds) when a spec gives at least as many numbers as the dense weight."""
    dense = rows * cols
    compressed = _structure_parameters(structure, rows, cols)
    if compressed < dense:
        return
    advice = "choose smaller sizes in the spec"
    rank = structure.get("rank")
    if getattr(spec, "rank", None) is not None and isinstance(rank, int):  # the user's rank (PHM's rank is its n)
        per_rank = _structure_parameters({**structure, "rank": 2}, rows, cols) - _structure_parameters(
            {**structure, "rank": 1}, rows, cols
        )
        fixed = _structure_parameters({**structure, "rank": 1}, rows, cols) - per_rank
        useful = (dense - 1 - fixed) // per_rank if per_rank > 0 else 0
        advice = f"rank <= {useful} compresses" if useful >= 1 else "no rank of this spec compresses it"
        advice += "; or use compression= (a target ratio > 1)"
    warnings.warn(
        f"{name}: {spec.method} gives {compressed:,} parameters for the {rows}x{cols} weight ({dense:,} dense), "
        f"so it does not compress; {advice}",
        stacklevel=4,
    )


def _plan(model: nn.Module, config: KronConfig, roles: ModelRoles) -> list[_Plan]:
    """Resolve every module's spec and structure; raise ``ValueError`` before any change."""
    candidates = [info for info in roles.modules.values() if is_linear(info.module) or is_embedding(info.module)]
    _warn_unmatched(config, candidates)
    specs = {id(info.module): _resolve_spec(info, config, roles) for info in candidates}
    plans: list[_Plan] = []
    handled: set[int] = set()
    input_embedding = roles.input_embedding
    head = roles.output_embedding
    # untied, the head keeps the shared dense Parameter (or is planned like any linear) once the embedding is swapped
    tied_head = roles.tied_head and not config.untie_lm_head

    if input_embedding is not None and is_embedding(input_embedding):
        group = [info for info in candidates if info.role == EMBEDDING_ROLE]
        embedding_info = roles.info(input_embedding)
        spec = specs[id(input_embedding)]
        handled.update(id(info.module) for info in group)
        if tied_head:
            head_info = roles.info(head)
            handled.add(id(head))
            head_spec = specs[id(head)]
            if spec is not None and head_spec is not None:
                raise ValueError(
                    f"{head_info.name} is tied to {embedding_info.name} (one shared weight), so it shares the "
                    f"embedding's factors; remove the lm_head spec or rule, or set untie_lm_head=True to give the "
                    f"head its own weight"
                )
            if spec is None and head_spec is not None:
                raise ValueError(
                    f"{head_info.name} is tied to {embedding_info.name}, which is not compressed; compress the "
                    f"embedding (the head then shares its factors) or set untie_lm_head=True"
                )
        if spec is not None:
            rows, cols = input_embedding.weight.shape
            for info in group:
                _embed_scale(info.module, info.name)  # validates custom embedding classes
            structure = spec.resolve(rows, cols, EMBEDDING, embedding_info.name)
            _warn_if_not_compressing(embedding_info.name, spec, structure, rows, cols)
            plans.append(_Plan(embedding_info, KIND_EMBEDDING, spec, structure, rows, cols, group))
            if tied_head:
                plans.append(_Plan(roles.info(head), KIND_TIED_HEAD, None, None, rows, cols))

    for info in candidates:
        if id(info.module) in handled:
            continue
        spec = specs[id(info.module)]
        if spec is None:
            continue
        if is_embedding(info.module):
            rows, cols = info.module.weight.shape
            _embed_scale(info.module, info.name)
            structure = spec.resolve(rows, cols, EMBEDDING, info.name)
            _warn_if_not_compressing(info.name, spec, structure, rows, cols)
            plans.append(_Plan(info, KIND_EMBEDDING, spec, structure, rows, cols, [info]))
        else:
            rows, cols = _weight_matrix(info.module).shape
            structure = spec.resolve(rows, cols, LINEAR, info.name)
            _warn_if_not_compressing(info.name, spec, structure, rows, cols)
            plans.append(_Plan(info, KIND_LINEAR, spec, structure, rows, cols))
    return plans


def _initialize(
    plan: _Plan,
    factorization: nn.Module,
    weight: torch.Tensor,
    init: str,
    stats: CalibrationStats | None,
    release_statistics: bool = False,
    time_ratio: float | None = CALIBRATED_TIME_RATIO,
) -> None:
    """Fill ``factorization`` by ``init``. ``calibrated`` weights linears by their input second moment and
    embeddings by token frequency; it falls back to ``svd`` (recording why) where no weighted solver
    exists (word2ket with LayerNorm, order > 2 embeddings, order > 2 linears whose ALS operands would pass the
    memory bound) or the layer saw no calibration input.

    A linear with a bias is fitted on its input covariance ``C - mu mu^T`` and its bias then absorbs the mean
    of the error, ``b' = b + (W - W_hat) mu`` (``plan.bias_shift``): the output error
    ``E||(W x + b) - (W_hat x + b')||^2 = tr(D (C - mu mu^T) D^T)`` is never above the uncentred fit's
    ``tr(D C D^T)``. ``release_statistics`` drops the layer's float64 sums from ``stats`` once its ``C`` is
    converted (block-by-block calibration: they are not needed again). ``time_ratio``: the calibrated solvers' time
    cap (``KronConfig.calibration_time_ratio``)."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"{plan.info.name}: its {plan.rows}x{plan.cols} weight holds {bad} NaN/inf entries, so it cannot be "
            f"factorized (init={init!r}); fix or reload the weights, or exclude {plan.info.name!r}"
        )
    frequency = stats.token_frequency(plan.info.name) if stats is not None and plan.kind == KIND_EMBEDDING else None
    mean = None
    if init == "calibrated" and stats is not None and getattr(plan.info.module, "bias", None) is not None:
        mean = stats.mean(plan.info.name)
    # C (and C - mu mu^T, formed in float64) in the solve's precision, the weight's but at least float32: one
    # cols x cols copy of that size (a large layer's C is the biggest operand of the calibrated init)
    solve_dtype = torch.promote_types(weight.dtype, torch.float32)
    if mean is None:
        second_moment = stats.second_moment(plan.info.name, solve_dtype) if stats is not None else None
        error_moment = second_moment
    else:
        second_moment = stats.second_moment(plan.info.name)
        error_moment = (second_moment - torch.outer(mean, mean)).to(solve_dtype)
        second_moment = second_moment.to(solve_dtype)
    if release_statistics and stats is not None:
        stats.discard(plan.info.name)
    if init == "random":
        factorization.reset_random(float(weight.detach().float().std()))
        plan.init_used = "random"
    elif init == "calibrated" and second_moment is not None:
        errors = factorization.fit_calibrated(weight, error_moment, time_ratio)
        plan.init_error = factorization.relative_error(weight) if errors is not None else factorization.fit(weight)
        plan.init_used = (
            "calibrated" if errors is not None else f"svd (no memory-bounded weighted solver for {plan.spec.method})"
        )
        if errors is not None:  # the solver's error is relative to ||W (C - mu mu^T)^(1/2)||; report it against C
            plan.output_error_start = errors[0] * _output_norm_ratio(weight, error_moment, second_moment)
    elif init == "calibrated" and frequency is not None and factorization.fit_row_weighted(weight, frequency):
        plan.init_error = factorization.relative_error(weight)
        plan.init_used = "calibrated (token frequency)"
    else:
        plan.init_error = factorization.fit(weight)
        if init == "svd":
            plan.init_used = "svd"
        elif plan.kind == KIND_EMBEDDING and frequency is not None:
            plan.init_used = f"svd (no frequency-weighted solver for {plan.spec.method} of this order)"
        elif plan.kind == KIND_EMBEDDING:
            plan.init_used = "svd (no calibration input reached this embedding)"
        else:
            plan.init_used = "svd (no calibration input reached this module)"
    if mean is not None:
        approximation = factorization.materialize()
        difference = weight.to(solve_dtype) - approximation.to(solve_dtype)
        plan.bias_shift = (difference @ mean.to(weight.device, solve_dtype)).to(weight.dtype)
        plan.output_error = weighted_error(weight, approximation, second_moment, -plan.bias_shift, mean)
    elif second_moment is not None:
        plan.output_error = weighted_error(weight, factorization.materialize(), second_moment)
    elif frequency is not None:
        plan.output_error = row_weighted_error(weight, factorization.materialize(), frequency)


def _output_norm_ratio(weight: torch.Tensor, numerator_moment: torch.Tensor, denominator_moment: torch.Tensor):
    """``sqrt(tr(W A W^T) / tr(W B W^T))``: turns an error relative to ``||W A^(1/2)||`` into one relative to
    ``||W B^(1/2)||`` (products in the weight's precision, at least float32; sums in float64)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    weight = weight.to(dtype)
    numerator = ((weight @ numerator_moment.to(dtype)).double() * weight).sum().clamp_min(0)
    denominator = ((weight @ denominator_moment.to(dtype)).double() * weight).sum().clamp_min(1e-300)
    return float((numerator / denominator).sqrt())


@torch.no_grad()
def _factorize(
    plan: _Plan,
    weight: torch.Tensor,
    init: str,
    stats: CalibrationStats | None,
    requires_grad: bool,
    release_statistics: bool = False,
    time_ratio: float | None = CALIBRATED_TIME_RATIO,
) -> nn.Module:
    """The plan's factorization, initialized from ``weight`` (``(rows, cols)``, on its device and dtype)."""
    factorization = build_factorization(plan.structure, plan.rows, plan.cols).to(weight.device, weight.dtype)
    _initialize(plan, factorization, weight, init, stats, release_statistics, time_ratio)
    factorization.requires_grad_(requires_grad)  # a frozen dense weight gives frozen factors
    return factorization


def _wrap(plan: _Plan, factorization: nn.Module | None, built_embeddings: dict[int, FactorizedEmbedding]) -> None:
    """Fill ``plan.replacements`` with the module(s) around ``factorization`` (None for a tied head)."""
    module = plan.info.module
    if plan.kind == KIND_TIED_HEAD:
        embedding = built_embeddings[id(module.weight)]
        plan.replacements = [TiedFactorizedHead(embedding, getattr(module, "bias", None))]
        return
    if plan.kind == KIND_EMBEDDING:
        plan.replacements = [
            FactorizedEmbedding.wrap(factorization, info.module.padding_idx, _embed_scale(info.module, info.name))
            for info in plan.group
        ]
        built_embeddings[id(module.weight)] = plan.replacements[0]
        return
    layout = CONV1D_LAYOUT if is_conv1d(module) else LINEAR_LAYOUT
    replacement = FactorizedLinear.wrap(factorization, module.bias is not None, layout)
    if module.bias is not None:
        bias = module.bias.detach().clone()
        if plan.bias_shift is not None:
            bias += plan.bias_shift.to(bias.device, bias.dtype)
        replacement.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    plan.replacements = [replacement]


@torch.no_grad()
def _build(
    plan: _Plan,
    init: str,
    built_embeddings: dict[int, FactorizedEmbedding],
    stats: CalibrationStats | None,
    release_statistics: bool = False,
    time_ratio: float | None = CALIBRATED_TIME_RATIO,
) -> None:
    factorization = None
    if plan.kind != KIND_TIED_HEAD:
        weight = _weight_matrix(plan.info.module)
        factorization = _factorize(plan, weight, init, stats, weight.requires_grad, release_statistics, time_ratio)
    _wrap(plan, factorization, built_embeddings)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def _record(plan: _Plan) -> dict[str, Any]:
    module = plan.info.module
    record: dict[str, Any] = {
        "role": plan.info.role,
        "kind": plan.kind,
        "shape": [plan.rows, plan.cols],
        "dense_class": _class_path(module),
        "aliases": plan.info.names[1:],
    }
    if plan.kind == KIND_TIED_HEAD:
        record["tied_to"] = None  # filled by compress_model with the embedding's name
        record["bias"] = getattr(module, "bias", None) is not None
        return record
    record.update(
        method=plan.spec.method,
        structure=plan.structure,
        init_error=plan.init_error,
        init=plan.init_used,
        output_error=plan.output_error,
        output_error_start=plan.output_error_start,
        dense_parameters=module.weight.numel(),
    )
    if plan.kind == KIND_EMBEDDING:
        record["padding_idx"] = module.padding_idx
        record["embed_scale"] = _embed_scale(module, plan.info.name)
        record["shared_with"] = [
            {
                "name": info.name,
                "aliases": info.names[1:],
                "padding_idx": info.module.padding_idx,
                "embed_scale": _embed_scale(info.module, info.name),
                "dense_class": _class_path(info.module),
            }
            for info in plan.group[1:]
        ]
    else:
        record["layout"] = CONV1D_LAYOUT if is_conv1d(module) else LINEAR_LAYOUT
        record["bias"] = module.bias is not None
    return record


def _pretrained_submodels(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return []
    return [(path, m) for path, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def _refresh_tied_keys(model: nn.Module) -> None:
    """Recompute transformers' ``all_tied_weights_keys`` on every PreTrainedModel (each with its submodels)."""
    for _, submodel in _pretrained_submodels(model):
        submodel.all_tied_weights_keys = submodel.get_expanded_tied_weights_keys(all_submodels=True)


def _rewrite_tied_weights_keys(model: nn.Module) -> None:
    """Map ``X.weight -> Y.weight`` ties between compressed modules to their shared factor names.

    Always from the model's original ties (kept aside the first time), so it can run again after a change.

    transformers computes ``all_tied_weights_keys`` in ``post_init`` and ``tie_weights`` would
    otherwise try to assign a ``weight`` Parameter onto a compressed module (REFERENCES.md part 2,
    pitfalls 2-4). Ties not involving compressed modules (BERT's decoder bias) are kept. The tied
    factor copies are declared in ``_keys_to_ignore_on_save`` (with each enclosing model's prefix), as
    transformers expects of keys a checkpoint leaves out because they are tied: ``Trainer`` then re-ties
    them when it resumes instead of reporting them missing.
    """
    tied_factor_keys: list[str] = []  # full names in ``model``
    for prefix, submodel in _pretrained_submodels(model):
        original = submodel.__dict__.get(ORIGINAL_TIES_ATTRIBUTE) or getattr(submodel, "_tied_weights_keys", None)
        if not original:
            continue
        rewritten: dict[str, str] = {}
        for target, source in original.items():
            if _is_parameter(submodel, target) and _is_parameter(submodel, source):
                rewritten[target] = source  # untouched, e.g. BERT's decoder.bias -> predictions.bias
                continue
            target_module = _module_of_parameter(submodel, target)
            source_module = _module_of_parameter(submodel, source)
            shared = getattr(target_module, "factorization", None)
            if shared is not None and shared is getattr(source_module, "factorization", None):
                target_base, source_base = target.rpartition(".")[0], source.rpartition(".")[0]
                for parameter_name, _ in shared.named_parameters():
                    key = f"{target_base}.factorization.{parameter_name}"
                    rewritten[key] = f"{source_base}.factorization.{parameter_name}"
                    tied_factor_keys.append(f"{prefix}.{key}" if prefix else key)
        if ORIGINAL_TIES_ATTRIBUTE not in submodel.__dict__:
            setattr(submodel, ORIGINAL_TIES_ATTRIBUTE, original)
        submodel._tied_weights_keys = rewritten
    for prefix, submodel in _pretrained_submodels(model):
        if ORIGINAL_IGNORE_ON_SAVE_ATTRIBUTE not in submodel.__dict__:
            setattr(submodel, ORIGINAL_IGNORE_ON_SAVE_ATTRIBUTE, submodel._keys_to_ignore_on_save)
        start = len(prefix) + 1 if prefix else 0
        own = {key[start:] for key in tied_factor_keys if not prefix or key.startswith(prefix + ".")}
        original_ignored = set(submodel.__dict__[ORIGINAL_IGNORE_ON_SAVE_ATTRIBUTE] or ())
        submodel._keys_to_ignore_on_save = (original_ignored | own) or None
    _refresh_tied_keys(model)


def _is_parameter(model: nn.Module, parameter_path: str) -> bool:
    try:
        model.get_parameter(parameter_path)
    except AttributeError:
        return False
    return True


def _module_of_parameter(model: nn.Module, parameter_path: str) -> nn.Module | None:
    module_path = parameter_path.rpartition(".")[0]
    return model.get_submodule(module_path) if _has_submodule(model, module_path) else None


def _restore_tied_weights_keys(model: nn.Module) -> None:
    for _, submodel in _pretrained_submodels(model):
        if ORIGINAL_TIES_ATTRIBUTE in submodel.__dict__:
            submodel._tied_weights_keys = submodel.__dict__.pop(ORIGINAL_TIES_ATTRIBUTE)
        if ORIGINAL_IGNORE_ON_SAVE_ATTRIBUTE in submodel.__dict__:
            submodel._keys_to_ignore_on_save = submodel.__dict__.pop(ORIGINAL_IGNORE_ON_SAVE_ATTRIBUTE)
    _refresh_tied_keys(model)


def _config_holder(model: nn.Module) -> Any:
    """Where the applied config lives: ``model.config`` for HF models, the module itself otherwise."""
    return getattr(model, "config", model)


def applied_config(model: nn.Module) -> KronConfig | None:
    """The ``KronConfig`` a model was compressed with, its ``modules`` holding the resolved structure.

    ``None`` for a model that is not compressed.
    """
    config = getattr(_config_holder(model), CONFIG_ATTRIBUTE, None)
    return config if isinstance(config, KronConfig) and config.modules is not None else None


def mark_compressed(model: nn.Module, config: KronConfig | None) -> None:
    """Record (or, with None, remove) the applied config; HF models also get the quantizer attributes.

    A model compressed in memory must look like one loaded from a compressed checkpoint, or
    transformers' save and Trainer checks diverge (REFERENCES.md part 2, pitfall 8): the transformers
    integration adds a listener (``add_compression_listener``) that attaches or detaches its quantizer.
    """
    holder = _config_holder(model)
    if config is None:
        if hasattr(holder, CONFIG_ATTRIBUTE):
            delattr(holder, CONFIG_ATTRIBUTE)
    else:
        setattr(holder, CONFIG_ATTRIBUTE, config)
    for listener in _COMPRESSION_LISTENERS:
        listener(model, config)


def add_compression_listener(listener: Callable[[nn.Module, KronConfig | None], None]) -> None:
    """Call ``listener(model, config)`` whenever ``mark_compressed`` records (or, with None, removes) a config.

    The transformers integration registers itself here, so surgery never imports it.
    """
    if listener not in _COMPRESSION_LISTENERS:
        _COMPRESSION_LISTENERS.append(listener)


def plan_compression(model: nn.Module, config: KronConfig) -> list[_Plan]:
    """Check ``config`` against ``model`` and resolve every replacement's structure; nothing is built or changed.

    Needs only shapes, so it also runs on a ``meta``-device skeleton (compress-while-loading).
    """
    if not isinstance(config, KronConfig):
        raise TypeError(f"compress_model: config must be a kron_transformers.KronConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if applied_config(model) is not None or any(isinstance(m, COMPRESSED_MODULES) for m in model.modules()):
        raise ValueError("compress_model: the model is already compressed; call decompress_model first")
    return _plan(model, config, detect_roles(model))


def compress_model(
    model: nn.Module, config: KronConfig, calibration_data: Iterable | CalibrationStats | None = None
) -> nn.Module:
    """Replace the model's linears and embeddings by factorized modules, in place; return the model.

    Roles come from ``roles.detect_roles`` (works on any HF model); each targeted module's spec
    is resolved to exact shapes and ranks (``KronConfig`` docstring), every replacement is built
    and initialized (``init="svd"``: best Frobenius approximation of the dense weight;
    ``"calibrated"``: best approximation of the layer's outputs on ``calibration_data``, a DataLoader /
    iterable of model-input dicts or ``kt.calibrate``'s result; ``"random"``: de novo, scaled to the
    dense weight's standard deviation), then all are
    swapped at once. A tied output head shares the embedding's factors (with ``untie_lm_head``: keeps the dense
    weight, or follows ``lm_head``). A copy of ``config``
    with the resolved structure in ``modules`` becomes ``model.config.quantization_config``.

    ```py
    model = kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(rank=4)))
    ```
    """
    plans = plan_compression(model, config)
    if config.init == "calibrated" and calibration_data is None:
        raise ValueError(
            "compress_model: init='calibrated' needs calibration_data= (a DataLoader or iterable of model-input "
            "dicts, or the result of kt.calibrate(model, batches))"
        )
    stats = calibration_data
    if calibration_data is not None and not isinstance(calibration_data, CalibrationStats):
        stats = calibrate(model, calibration_data)
    if not plans:
        warnings.warn("compress_model: no module matched the config; the model is unchanged", stacklevel=2)
        return model

    built_embeddings: dict[int, FactorizedEmbedding] = {}
    order = build_order(plans)
    for plan in order:
        _build(plan, config.init, built_embeddings, stats, time_ratio=config.calibration_time_ratio)
    swap_in(model, config, order)
    return model


def build_order(plans: list[_Plan]) -> list[_Plan]:
    """The order replacements are built in (tied heads after their embeddings); random inits draw in this order."""
    return sorted(plans, key=lambda p: p.kind == KIND_TIED_HEAD)


def swap_in(model: nn.Module, config: KronConfig, order: list[_Plan]) -> None:
    """Swap every built replacement in at once and record the resolved structure on the model."""
    records: dict[str, Any] = {}
    embedding_names: dict[int, str] = {}
    for plan in order:
        infos = plan.group if plan.kind == KIND_EMBEDDING else [plan.info]
        for info, replacement in zip(infos, plan.replacements):
            replacement.train(info.module.training)
            for path in info.names:
                set_module(model, path, replacement)
        record = _record(plan)
        if plan.kind == KIND_EMBEDDING:
            embedding_names[id(plan.info.module.weight)] = plan.info.name
        if plan.kind == KIND_TIED_HEAD:
            record["tied_to"] = embedding_names[id(plan.info.module.weight)]
        records[plan.info.name] = record
        if plan.init_error is not None:
            logger.info("%s: %s init relative error %.4f", plan.info.name, plan.spec.method, plan.init_error)

    _own_config(model)
    mark_compressed(model, dataclasses.replace(copy.deepcopy(config), modules=records))
    _rewrite_tied_weights_keys(model)


def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and its submodules holding the same object) a private copy of ``model.config``.

    ``from_config(cfg)`` shares ``cfg`` among every model built from it; recording the compression on
    the shared object would mark those other models compressed too.
    """
    shared = getattr(model, "config", None)
    if shared is None:
        return
    private = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = private


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def resolve_recorded_name(model: nn.Module, name: str) -> str | None:
    """Map a recorded module name onto ``model``, across ``base_model_prefix`` (pitfall 7).

    A head model's checkpoint (``bert.encoder...``) loaded into the base model drops the prefix;
    a base model's checkpoint loaded into a head model gains it. ``None`` when the module does
    not exist in ``model`` (e.g. the LM head when loading into the base model).
    """
    if _has_submodule(model, name):
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and _has_submodule(model, name[len(prefix) + 1 :]):
        return name[len(prefix) + 1 :]
    if prefix and _has_submodule(model, f"{prefix}.{name}"):
        return f"{prefix}.{name}"
    return None


def _resolved_paths(model: nn.Module, names: list[str]) -> list[str]:
    return [path for path in (resolve_recorded_name(model, n) for n in names) if path is not None]


def _check_absent_module_is_another_head(model: nn.Module, name: str) -> None:
    """A recorded module may be absent only when loading into another class (e.g. the LM head into the base model).

    Loading into the recorded architecture, every recorded module must exist; otherwise its top-level
    branch must be missing altogether (the other class's head), not just a module inside a branch this model has.
    """
    architectures = getattr(getattr(model, "config", None), "architectures", None) or []
    prefix = getattr(model, "base_model_prefix", "")
    top = (name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name).split(".")[0]
    other_class = bool(architectures) and architectures[0] != type(model).__name__
    if other_class and not _has_submodule(model, top) and not _has_submodule(model, f"{prefix}.{top}"):
        return
    raise ValueError(
        f"config.json's compression record names the module {name!r}, which {type(model).__name__} does not have; "
        f"the record does not belong to this model (edited config.json, or a checkpoint of another model)"
    )


@contextlib.contextmanager
def _record_must_fit(name: str, entry: dict[str, Any], rows: int, cols: int) -> Iterator[None]:
    """Building from a ``config.json`` record that does not fit raises a ValueError naming the module."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{name}: the recorded structure {entry.get('structure')} does not fit its {rows}x{cols} shape: {error}"
        ) from None


@torch.no_grad()
def rebuild_structure(model: nn.Module, config: KronConfig) -> KronConfig:
    """Swap in factorized modules exactly as recorded in ``config.modules``, before weights load.

    The structure comes from the record, never from re-running the shape heuristics, so a
    checkpoint always rebuilds as it was saved. New parameters are created on the device of the
    module they replace (``meta`` inside ``from_pretrained``) in torch's current default dtype.
    Returns ``config`` with ``modules`` renamed to this model's names (prefix changes applied).
    """
    kind_order = {KIND_EMBEDDING: 0, KIND_LINEAR: 1, KIND_BLOCK_SPARSE: 1, KIND_TIED_HEAD: 2}
    embeddings: dict[str, FactorizedEmbedding] = {}
    resolved: dict[str, Any] = {}
    for name, entry in sorted(config.modules.items(), key=lambda item: kind_order[item[1]["kind"]]):
        paths = _resolved_paths(model, [name, *entry.get("aliases", [])])
        if not paths:
            _check_absent_module_is_another_head(model, name)
            continue
        current = model.get_submodule(paths[0])
        device = next(current.parameters(), torch.empty(0)).device
        rows, cols = entry["shape"]
        entry = copy.deepcopy(entry)
        with torch.device(device):
            if entry["kind"] == KIND_TIED_HEAD:
                tied_to = resolve_recorded_name(model, entry["tied_to"])
                if tied_to not in embeddings:
                    raise ValueError(f"{name}: recorded as tied to {entry['tied_to']!r}, which is not compressed")
                replacement = TiedFactorizedHead(embeddings[tied_to], getattr(current, "bias", None))
                entry["tied_to"] = tied_to
            elif entry["kind"] == KIND_EMBEDDING:
                with _record_must_fit(name, entry, rows, cols):
                    factorization = build_factorization(entry["structure"], rows, cols)
                replacement = FactorizedEmbedding.wrap(factorization, entry["padding_idx"], entry["embed_scale"])
                embeddings[paths[0]] = replacement
                shared_members = []
                for member in entry.get("shared_with", []):
                    member_paths = _resolved_paths(model, [member["name"], *member["aliases"]])
                    if not member_paths:
                        _check_absent_module_is_another_head(model, member["name"])
                        continue
                    shared = FactorizedEmbedding.wrap(factorization, member["padding_idx"], member["embed_scale"])
                    for path in member_paths:
                        set_module(model, path, shared)
                    shared_members.append({**member, "name": member_paths[0], "aliases": member_paths[1:]})
                entry["shared_with"] = shared_members
            elif entry["kind"] == KIND_BLOCK_SPARSE:
                block_size, nonzero_blocks = entry["structure"]["block_size"], entry["structure"]["nonzero_blocks"]
                replacement = BlockSparseLinear(
                    cols, rows, tuple(block_size), nonzero_blocks, entry["bias"], entry["layout"]
                )
            else:
                with _record_must_fit(name, entry, rows, cols):
                    replacement = FactorizedLinear.from_structure(
                        entry["structure"], cols, rows, entry["bias"], entry["layout"]
                    )
        for path in paths:
            set_module(model, path, replacement)
        entry["aliases"] = paths[1:]
        resolved[paths[0]] = entry
    _rewrite_tied_weights_keys(model)
    return dataclasses.replace(config, modules=resolved)


def _dense_class(path: str | None, default: type[nn.Module]) -> type[nn.Module]:
    if not path:
        return default
    module_name, _, qualname = path.partition(":")
    try:
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        return default
    return cls if isinstance(cls, type) and issubclass(cls, default) else default


def _dense_embedding(
    weight: nn.Parameter, padding_idx: int | None, embed_scale: float | None, class_path: str | None
) -> nn.Embedding:
    cls = _dense_class(class_path, nn.Embedding)
    embedding = cls.__new__(cls)
    nn.Embedding.__init__(embedding, weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight)
    embedding.weight = weight  # the same Parameter object for every tied member
    if embed_scale is not None:
        embedding.embed_scale = embed_scale
    return embedding


def _dense_linear(module: FactorizedLinear | BlockSparseLinear) -> nn.Module:
    weight = nn.Parameter(module.materialize().detach().clone())
    if module.weight_layout == CONV1D_LAYOUT:
        dense = conv1d_class()(module.out_features, module.in_features)
        dense.to(weight.device, weight.dtype)
        dense.weight = weight
        dense.bias = module.bias if module.bias is not None else nn.Parameter(torch.zeros_like(dense.bias))
        return dense
    return _linear_with(module, weight)


def _linear_with(module: nn.Module, weight: nn.Parameter) -> nn.Linear:
    """An ``nn.Linear`` of ``module``'s sizes computing from the dense ``weight`` (and ``module``'s bias)."""
    dense = nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
    )
    dense.weight = weight
    if module.bias is not None:
        dense.bias = module.bias
    return dense


@torch.no_grad()
def untie_lm_head(model: nn.Module) -> nn.Module:
    """Give a compressed model's tied output head its own dense weight, the embedding's materialized table.

    The logits are unchanged; from then on the head trains apart from the factorized embedding, as
    ``KronConfig(untie_lm_head=True)`` makes it at compression time (word2ket compresses only the input
    embedding, Panahi et al., section 3.5). The recorded config says so, and the checkpoint then saves the head
    and reloads it untied. In place; returns the model.

    ```py
    model = kt.untie_lm_head(AutoModelForSeq2SeqLM.from_pretrained("t5-word2ketxs"))  # then fine-tune
    ```
    """
    config = applied_config(model)
    records = config.modules if config is not None else {}
    heads = {name: entry for name, entry in records.items() if entry["kind"] == KIND_TIED_HEAD}
    if not heads:
        raise ValueError(
            "untie_lm_head: the model has no output head tied to a compressed embedding (not compressed, no "
            "compressed embedding, or already untied); nothing to untie"
        )
    for name, entry in heads.items():
        head = model.get_submodule(name)
        dense = _linear_with(head, nn.Parameter(head.materialize().detach().clone()))
        dense.train(head.training)
        for path in [name, *entry.get("aliases", [])]:
            set_module(model, path, dense)
    kept = {name: entry for name, entry in records.items() if name not in heads}
    mark_compressed(model, dataclasses.replace(config, modules=kept, untie_lm_head=True))
    _rewrite_tied_weights_keys(model)
    return model


@torch.no_grad()
def decompress_model(model: nn.Module) -> nn.Module:
    """Materialize every compressed module back to plain ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``.

    Outputs are identical up to floating-point rounding; a tied head becomes an ``nn.Linear``
    sharing the embedding's new weight Parameter, so the model stays tied; a head ``untie_lm_head`` untied stays
    untied. In place; returns the model.
    """
    config = applied_config(model)
    class_paths: dict[str, str] = {}
    for name, entry in (config.modules if config is not None else {}).items():
        for alias in [name, *entry.get("aliases", [])]:
            class_paths[alias] = entry.get("dense_class")
        for member in entry.get("shared_with", []):
            for alias in [member["name"], *member["aliases"]]:
                class_paths[alias] = member["dense_class"]

    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, COMPRESSED_MODULES):
            paths.setdefault(id(module), []).append(path)
            modules[id(module)] = module

    dense_tables: dict[int, nn.Parameter] = {}

    def table_for(module: nn.Module) -> nn.Parameter:
        key = id(module.factorization)
        if key not in dense_tables:
            dense_tables[key] = nn.Parameter(module.materialize().detach().clone())
        return dense_tables[key]

    replacements: dict[int, nn.Module] = {}
    for key, module in modules.items():
        if isinstance(module, FactorizedEmbedding):
            replacements[key] = _dense_embedding(
                table_for(module), module.padding_idx, module.embed_scale, class_paths.get(paths[key][0])
            )
        elif isinstance(module, (FactorizedLinear, BlockSparseLinear)):
            replacements[key] = _dense_linear(module)
    for key, module in modules.items():
        if isinstance(module, TiedFactorizedHead):
            replacements[key] = _linear_with(module, table_for(module))
    for key, replacement in replacements.items():
        replacement.train(modules[key].training)
        for path in paths[key]:
            set_module(model, path, replacement)
    _restore_tied_weights_keys(model)
    if config is not None and config.untie_lm_head:
        _forget_broken_ties(model)
    mark_compressed(model, None)
    return model


def _forget_broken_ties(model: nn.Module) -> None:
    """Drop declared ties whose two parameters are now separate objects (a head that ``untie_lm_head`` untied).

    ``tie_weights`` (and ``save_pretrained``, which leaves tied keys out) would otherwise put the embedding's
    weight back into the head.
    """
    forgotten = []
    for _, submodel in _pretrained_submodels(model):
        ties = getattr(submodel, "_tied_weights_keys", None) or {}
        broken = [
            target
            for target, source in ties.items()
            if _is_parameter(submodel, target)
            and _is_parameter(submodel, source)
            and submodel.get_parameter(target) is not submodel.get_parameter(source)
        ]
        if broken:
            submodel._tied_weights_keys = {t: s for t, s in ties.items() if t not in broken}
            forgotten += broken
    _refresh_tied_keys(model)
    if forgotten and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        warnings.warn(
            f"decompress_model: {', '.join(sorted(set(forgotten)))} keeps its own weight (untie_lm_head=True), but "
            f"config.tie_word_embeddings is True, so from_pretrained of a save_pretrained copy ties it to the "
            f"embedding again (T5 always does); keep the compressed checkpoint, or save under a config that unties",
            stacklevel=3,
        )
