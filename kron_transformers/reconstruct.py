"""``kt.reconstruct``: block-wise reconstruction of a compressed model against its dense teacher.

The approach that makes post-training quantization work (AdaRound: Nagel et al., "Up or Down? Adaptive
Rounding for Post-Training Quantization"; BRECQ: Li et al., "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction"; GPTQ: Frantar et al.), applied to factorized layers. For each
transformer block ``i``, in the order the model runs them:

    X_i  = the inputs of block i in the *compressed* student (its blocks < i already reconstructed)
    Y_i  = the dense teacher's output of block i
    min over the block's factor parameters   sum ||student_block_i(X_i) - Y_i||^2 / sum ||Y_i||^2

by Adam on the cached ``X_i`` (one calibration batch per step). GPTQ and BRECQ take the target on the same
inputs (``target_inputs="student"``: ``Y_i = teacher_block_i(X_i)``); the default ``target_inputs="teacher"``
takes the teacher block's output on the teacher's own inputs, ``Y_i = teacher_block_i(X_i^teacher)`` (the dense
model's true activations), so that each block also corrects the error its predecessors left. Measured on
all-MiniLM-L6-v2 with Shapeshifter 4x (svd init, 40 steps per block, 300 Multi30k test sentences), the mean
cosine of the sentence embeddings to the dense model's went from 0.15 to 0.51 with ``"teacher"`` and to 0.45
with ``"student"``.

Before the Adam steps, ``refit=True`` refits each factorized linear of the block in closed form, in the order
the block runs them (linears that read the same input tensor, such as a query, key and value, together):

    x~ = the linear's input in the student block on X_i,   x = the dense linear's input in the teacher block
    min over the factorization (and bias) of   sum ||(W x + b) - (W_hat x~ + b_hat)||^2

the asymmetric least-squares problem of GPTAQ (Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration", 2025), solved for factorized layers: with ``C~ = E[x~ x~^T]`` and ``M = E[x x~^T]`` it
is ``min ||(W* - W_hat) C~^(1/2)||_F`` for ``W* = W M (C~ + lambda I)^-1`` (``factorizations/weighted.py``
solves it; ``lambda`` = ``REFIT_DAMPING`` times the mean diagonal of ``C~``); a linear with a bias is fitted on
the covariances instead and its bias set to ``b + W mu - W_hat mu~``. With ``target_inputs="student"``
(``x = x~``) it is GPTQ's symmetric problem, ``W* = W``. Measured on all-MiniLM-L6-v2, Shapeshifter 2x
(``compress_model(init="calibrated")`` then ``reconstruct(steps=0, refit=True)``, 512 Multi30k training
sentences, the cosine to the dense sentence embeddings on 1000 test sentences): see ``benchmarks/RESULTS.md``.
The refit is for ``steps=0`` or few steps: followed by 200 Adam steps per block (``trainable="block"``,
``lr=3e-3``, Shapeshifter 4x from the calibrated init, 2,048 sentences) it gave 0.876 in 292 CPU-s, the
steps alone 0.879 in 155.

Memory: one block's cached inputs, outputs and targets (plus its positional arguments and keyword arguments
such as attention masks and rotary position embeddings, captured by a forward pre-hook), never the whole
model's. Time: a block's inputs are the previous block's outputs (checked on one batch; otherwise the model
runs up to the block), and the refit's passes stop at the linears they read, so each block costs a few passes
over the calibration data besides its Adam steps.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import move_to_device
from .factorizations.weighted import CALIBRATED_TIME_RATIO
from .modules import COMPRESSED_MODULES


TARGET_INPUTS = ("student", "teacher")
# lambda / mean diag(C~) of the refit's W* = W M (C~ + lambda I)^-1. MiniLM, Shapeshifter 2x, calibrated + refit,
# cosine to the dense embeddings at 1e-1 / 1e-2 / 1e-3 / 1e-4: 0.838 / 0.841 / 0.849 / 0.842 (ALS noise ~0.005)
REFIT_DAMPING = 1e-3
TRAINABLE = ("compressed", "block")


@dataclass
class BlockReconstruction:
    """One block's relative output error ``sum ||s - t||^2 / sum ||t||^2`` before and after fitting."""

    name: str
    error_before: float
    error_after: float
    steps: int
    parameters: int


@dataclass
class ReconstructionReport:
    """What ``kt.reconstruct`` did, block by block."""

    blocks: list[BlockReconstruction] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'block':<40} {'params':>9} {'error before':>13} {'error after':>12}"]
        for block in self.blocks:
            lines.append(
                f"{block.name:<40} {block.parameters:>9} {block.error_before:>13.5f} {block.error_after:>12.5f}"
            )
        return "\n".join(lines)


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the block of interest needs to run."""


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks (e.g. ``bert.encoder.layer.0``), in module order.

    A block is a child of an ``nn.ModuleList`` whose children all share one class; the classes the model
    lists in ``_no_split_modules`` (transformers' own notion of a block) are preferred, otherwise the
    lists holding the most parameters. Encoder-decoder models have two such lists (both are returned).
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((name, type(module[0]).__name__, size))
    preferred = [c for c in candidates if c[1] in no_split]
    if not preferred and candidates:
        largest = max(size for _, _, size in candidates)
        preferred = [c for c in candidates if c[2] * 2 >= largest]  # the stack(s), not small helper lists
    # nested lists (a block's own ModuleList of heads or experts) are not blocks
    names = [c[0] for c in preferred]
    names = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    return [f"{name}.{index}" for name in names for index in range(len(model.get_submodule(name)))]


def resolve_blocks(
    model: nn.Module, blocks: list[str] | None, owner: str, holder: nn.Module | None = None, holder_label: str = ""
) -> list[str]:
    """``blocks`` (default: ``find_blocks(model)``), each checked to exist in ``holder`` (default: ``model``).

    Raises a ``ValueError`` naming ``owner`` when no block is found or one is missing.
    """
    names = find_blocks(model) if blocks is None else list(blocks)
    if not names:
        raise ValueError(
            f"{owner}: found no transformer blocks in {type(model).__name__} (an nn.ModuleList of blocks of one "
            "class); pass blocks=[...] with the block module names"
        )
    holder = model if holder is None else holder
    for name in names:
        try:
            holder.get_submodule(name)
        except AttributeError:
            label = holder_label or type(holder).__name__
            raise ValueError(f"{owner}: {label} has no module {name!r}") from None
    return names


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _first_tensor(output) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of its tuple / model output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"reconstruct: a block returned {type(output).__name__}; expected a tensor or a tuple of them")


def _model_kwargs(model: nn.Module) -> dict:
    """Forward arguments that make a run cache-free (no key/value cache objects in the captured kwargs)."""
    parameters = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in parameters or "kwargs" in parameters else {}


@torch.no_grad()
def _capture_inputs(model: nn.Module, block_name: str, batches: list[dict]) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of ``block_name`` for each batch; the forward stops at the block."""
    block = model.get_submodule(block_name)
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((_detach(args), _detach(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    extra = _model_kwargs(model)
    try:
        for batch in batches:
            try:
                model(**batch, **extra)
            except _StopForward:
                continue
            raise ValueError(f"reconstruct: block {block_name} did not run on a calibration batch")
    finally:
        handle.remove()
    return captured


def _execution_order(model: nn.Module, names: list[str], batch: dict) -> list[str]:
    """``names`` sorted by when each block first runs (encoder stack before decoder stack)."""
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(**batch, **_model_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    seen = list(dict.fromkeys(order))
    missing = [name for name in names if name not in seen]
    if missing:
        raise ValueError(f"reconstruct: blocks {missing} never ran on the calibration data")
    return seen


@torch.no_grad()
def _block_outputs(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    return [_first_tensor(block(*args, **kwargs)).detach() for args, kwargs in inputs]


def _relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    error = sum(float((output - target).pow(2).sum()) for output, target in zip(outputs, targets))
    energy = sum(float(target.pow(2).sum()) for target in targets)
    return error / max(energy, 1e-30)


def _with_hidden(inputs: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict] | None:
    """A block's ``(args, kwargs)`` with its hidden states (the first argument, or ``hidden_states=``) replaced by
    ``hidden``; None when it has no hidden-state tensor there."""
    args, kwargs = inputs
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": hidden}
    return None


def _same(first, second) -> bool:
    """Structurally equal block inputs (tensors: same shape and values)."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.shape == second.shape
            and torch.equal(first, second)
        )
    if isinstance(first, (tuple, list)) and isinstance(second, (tuple, list)):
        return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)
    return first is second or (type(first) is type(second) and first == second)


def _next_block_inputs(
    model: nn.Module,
    name: str,
    batches: list[dict],
    inputs: list[tuple[tuple, dict]],
    outputs: list[torch.Tensor],
) -> list[tuple[tuple, dict]]:
    """The inputs of block ``name`` on every batch, given the previous block's ``inputs`` and ``outputs``.

    In a stack the next block reads the previous block's output with the same other arguments (masks, position
    embeddings); that is checked on the first batch against a real capture, and then the other batches take
    ``outputs`` as they are: no forward through the blocks before. Otherwise (the first decoder block, a block
    that is handed a position bias its predecessor made, ...) the model runs up to the block on every batch.
    """
    first = _capture_inputs(model, name, batches[:1])[0]
    chained = [_with_hidden(block_inputs, output) for block_inputs, output in zip(inputs, outputs)]
    if all(block_inputs is not None for block_inputs in chained) and _same(first, chained[0]):
        return chained
    return [first, *_capture_inputs(model, name, batches[1:])]


def _trainable_parameters(block: nn.Module, trainable: str) -> list[nn.Parameter]:
    if trainable == "block":
        return [p for p in block.parameters() if p.requires_grad]
    seen: set[int] = set()
    parameters = []
    for module in block.modules():
        if isinstance(module, COMPRESSED_MODULES):
            for parameter in module.parameters():
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    parameters.append(parameter)
    return parameters


def _refit_groups(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[list[str]]:
    """The block's factorized linears (names within the block) in the order they run, those reading the same
    input tensor grouped: a group's inputs do not depend on its own members."""
    from .modules import FactorizedLinear

    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: calls.append((name, a[0])))
        for name, module in block.named_modules()
        if isinstance(module, FactorizedLinear)
    ]
    try:
        with torch.no_grad():
            args, kwargs = inputs[0]
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in calls:
        if any(name in members for _, members in groups):
            continue  # a module called twice (shared) is refitted at its first call
        if groups and groups[-1][0] is tensor:
            groups[-1][1].append(name)
        else:
            groups.append((tensor, [name]))
    return [members for _, members in groups]


@torch.no_grad()
def _group_moments(
    student_block: nn.Module,
    teacher_block: nn.Module,
    members: list[str],
    inputs: list[tuple[tuple, dict]],
    source: list[tuple[tuple, dict]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sums over the calibration tokens of ``x~ x~^T``, ``x x~^T``, ``x~`` and ``x`` (float64) for the group's
    input: ``x~`` in the student block on its inputs, ``x`` in the teacher block on ``source``. A batch's products
    are taken in the inputs' precision (at least float32) and summed in float64: a float64 matmul costs about as
    much as the block passes (MiniLM, 2,048 sentences: 54 of 179 CPU-s of the refit)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(label):
        def hook(module, args):
            hidden = args[0].detach()
            seen[label] = hidden.reshape(-1, hidden.shape[-1]).to(torch.promote_types(hidden.dtype, torch.float32))
            raise _StopForward  # the rest of the block is not needed

        return hook

    def run_until_group(block: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            block(*args, **kwargs)
        except _StopForward:
            return

    handles = [
        student_block.get_submodule(members[0]).register_forward_pre_hook(keep("student")),
        teacher_block.get_submodule(members[0]).register_forward_pre_hook(keep("teacher")),
    ]
    student_gram = cross = student_sum = teacher_sum = None
    count = 0
    try:
        for (args, kwargs), (source_args, source_kwargs) in zip(inputs, source):
            seen.clear()
            run_until_group(student_block, args, kwargs)
            run_until_group(teacher_block, source_args, source_kwargs)
            student_x, teacher_x = seen["student"], seen["teacher"]
            if student_gram is None:
                size = student_x.shape[1]
                zeros = dict(dtype=torch.float64, device=student_x.device)
                student_gram, cross = torch.zeros(size, size, **zeros), torch.zeros(size, size, **zeros)
                student_sum, teacher_sum = torch.zeros(size, **zeros), torch.zeros(size, **zeros)
            teacher_x = teacher_x.to(student_x.dtype)
            student_gram += student_x.T @ student_x
            cross += teacher_x.T @ student_x
            student_sum += student_x.sum(0, dtype=torch.float64)
            teacher_sum += teacher_x.sum(0, dtype=torch.float64)
            count += student_x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return student_gram, cross, student_sum, teacher_sum, count


@torch.no_grad()
def _refit_linear(
    module: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
    damping: float | None = None,
    time_ratio: float | None = CALIBRATED_TIME_RATIO,
) -> bool:
    """Refit a ``FactorizedLinear`` to the dense ``(weight (out, in), bias)`` on paired inputs (module docstring):
    ``min E||(W x + b) - (W_hat x~ + b_hat)||^2`` over its factorization and bias. Returns False (module
    unchanged) when its factorization has no weighted solver. ``damping``: ``lambda / mean diag(C~)`` (default
    ``REFIT_DAMPING``); ``time_ratio``: the weighted solver's time cap (``KronConfig.calibration_time_ratio``)."""
    damping = REFIT_DAMPING if damping is None else damping
    student_gram, cross, student_sum, teacher_sum, count = moments
    student_mean, teacher_mean = student_sum / count, teacher_sum / count
    weight64 = weight.detach().to(torch.float64)
    if bias is not None:  # covariances; the bias absorbs the means
        moment = student_gram / count - torch.outer(student_mean, student_mean)
        cross_moment = cross / count - torch.outer(teacher_mean, student_mean)
    else:
        moment, cross_moment = student_gram / count, cross / count
    size = moment.shape[0]
    damped = moment + damping * float(moment.diagonal().mean().clamp_min(1e-30)) * torch.eye(size, dtype=moment.dtype)
    target = torch.linalg.solve(damped, cross_moment.T @ weight64.T).T  # W M (C~ + lambda I)^-1 (symmetric C~)
    factorization = module.factorization
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if factorization.fit_calibrated(target.to(dtype), moment.to(dtype), time_ratio) is None:
        return False  # no weighted solver: fit_calibrated returned before touching the factors
    if module.bias is not None:
        approximation = factorization.materialize().to(torch.float64)
        dense_bias = 0.0 if bias is None else bias.detach().to(torch.float64)
        module.bias.copy_((dense_bias + weight64 @ teacher_mean - approximation @ student_mean).to(module.bias.dtype))
    return True


def _refit_block(
    student_block: nn.Module,
    teacher_block: nn.Module,
    inputs: list[tuple[tuple, dict]],
    source: list[tuple[tuple, dict]],
    time_ratio: float | None,
) -> None:
    """Refit every factorized linear of the block, group by group in execution order (module docstring)."""
    from .surgery import _weight_matrix

    for members in _refit_groups(student_block, inputs):
        moments = _group_moments(student_block, teacher_block, members, inputs, source)
        for name in members:
            dense = teacher_block.get_submodule(name)
            module = student_block.get_submodule(name)
            _refit_linear(module, _weight_matrix(dense), dense.bias, moments, time_ratio=time_ratio)


def _calibration_time_ratio(model: nn.Module) -> float | None:
    """The ``calibration_time_ratio`` the model was compressed with (the default if it has no KronConfig)."""
    from .config import KronConfig

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config.calibration_time_ratio if isinstance(config, KronConfig) else CALIBRATED_TIME_RATIO


def _steps_per_block(steps: int | Sequence[int], names: list[str]) -> list[int]:
    """``steps`` as one count per block of ``names`` (an int is every block's)."""
    counts = [steps] * len(names) if isinstance(steps, int) else list(steps)
    if len(counts) != len(names) or not all(isinstance(count, int) and count >= 0 for count in counts):
        raise ValueError(
            f"reconstruct: steps must be an int >= 0 or {len(names)} of them, one per block in execution order "
            f"({', '.join(names)}); got {steps!r}"
        )
    return counts


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    steps: int | Sequence[int] = 200,
    lr: float = 1e-3,
    target_inputs: str = "teacher",
    trainable: str = "compressed",
    blocks: list[str] | None = None,
    progress: bool | None = None,
    refit: bool = False,
) -> ReconstructionReport:
    """Fit each block of the compressed ``student`` to the dense ``teacher``'s block, one block at a time.

    ``batches``: model-input dicts (a DataLoader or a list; iterated once and kept); each Adam step uses one
    of them (a mini-batch of cached block inputs). ``steps``: Adam steps per block (or a list, one per block in
    execution order: the last block's error is what the model outputs, and with ``target_inputs="teacher"`` the
    blocks before it pass theirs on to be corrected), learning rate ``lr`` decayed by a cosine to 0. On
    all-MiniLM-L6-v2, Shapeshifter 4x: 200 steps per block and 800 for the last gave a mean cosine to the dense
    sentence embeddings of 0.902; 400 for every block (after the refit) 0.894 in 1.8x the CPU time
    (``benchmarks/RESULTS.md``).
    ``target_inputs``: ``"teacher"`` fits each block to the dense model's own block
    output, ``"student"`` to the dense block applied to the student's inputs (module docstring).
    ``trainable="compressed"`` fits the factorized modules' parameters (factors and biases); ``"block"`` also
    the block's norms and remaining dense layers. A block whose error did not drop keeps its previous
    parameters, so no block ends worse than it started. ``blocks`` overrides the block names found by
    :func:`find_blocks`. ``refit=True`` first refits each factorized linear in closed form to the teacher's layer
    outputs on the student's inputs (asymmetric least squares, module docstring; the solvers' time cap is the
    student's ``KronConfig.calibration_time_ratio``); ``steps=0, refit=True`` is
    that refit alone, without gradient steps. Returns a :class:`ReconstructionReport` (relative error per
    block). A tqdm bar shows the progress when stderr is a terminal (``progress=`` forces it on or off).

    ```py
    report = kt.reconstruct(compressed, dense, batches, steps=200)
    print(report)
    ```
    """
    if target_inputs not in TARGET_INPUTS:
        raise ValueError(f"reconstruct: target_inputs must be one of {TARGET_INPUTS}, got {target_inputs!r}")
    if trainable not in TRAINABLE:
        raise ValueError(f"reconstruct: trainable must be one of {TRAINABLE}, got {trainable!r}")
    device = next(student.parameters()).device
    batches = [move_to_device(dict(batch), device) for batch in batches]
    if not batches:
        raise ValueError("reconstruct: batches is empty; pass a DataLoader or list of model-input dicts")
    names = resolve_blocks(teacher, blocks, "reconstruct", holder=student, holder_label="the student")
    names = _execution_order(teacher, names, batches[0])
    block_steps = _steps_per_block(steps, names)

    was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    report = ReconstructionReport()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(block_steps), desc="reconstruct", disable=not show)
    try:
        inputs = _capture_inputs(student, names[0], batches)
        source = inputs if target_inputs == "student" else _capture_inputs(teacher, names[0], batches)
        for position, name in enumerate(names):
            student_block, teacher_block = student.get_submodule(name), teacher.get_submodule(name)
            targets = _block_outputs(teacher_block, source)
            parameters = _trainable_parameters(student_block, trainable)
            outputs = _block_outputs(student_block, inputs)
            before = _relative_error(outputs, targets)
            after, taken = before, 0
            saved = copy.deepcopy([p.detach() for p in parameters])
            if refit:
                _refit_block(student_block, teacher_block, inputs, source, _calibration_time_ratio(student))
            budget = block_steps[position]
            if parameters and budget:
                optimizer = torch.optim.Adam(parameters, lr=lr)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=budget)
                order = torch.randperm(len(inputs) * (budget // len(inputs) + 1))
                for step in range(budget):
                    index = int(order[step]) % len(inputs)
                    args, kwargs = inputs[index]
                    target = targets[index]
                    output = _first_tensor(student_block(*args, **kwargs))
                    loss = (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    bar.update(1)
                    bar.set_postfix(block=name, loss=f"{loss.item():.4f}", refresh=False)
                taken = budget
            else:
                bar.update(budget)
            if refit or taken:
                outputs = _block_outputs(student_block, inputs)
                after = _relative_error(outputs, targets)
                if not after < before:
                    with torch.no_grad():
                        for parameter, value in zip(parameters, saved):
                            parameter.copy_(value)
                    outputs, after = _block_outputs(student_block, inputs), before
            report.blocks.append(BlockReconstruction(name, before, after, taken, sum(p.numel() for p in parameters)))
            if position + 1 < len(names):
                following = names[position + 1]
                next_inputs = _next_block_inputs(student, following, batches, inputs, outputs)
                if target_inputs == "student":
                    source = next_inputs
                else:
                    source = _next_block_inputs(teacher, following, batches, source, targets)
                inputs = next_inputs
            del outputs, targets
    finally:
        bar.close()
        for parameter in student.parameters():
            parameter.grad = None
        student.train(was_training[0])
        teacher.train(was_training[1])
    return report
