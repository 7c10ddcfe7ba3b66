"""``kt.distill``: bring a compressed model back close to its dense teacher by knowledge distillation."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import move_to_device
from .surgery import applied_config


def _hidden_states(output) -> list[torch.Tensor]:
    """Every hidden-state tensor an HF output carries (encoder and decoder stacks included)."""
    states = []
    for key, value in output.items():
        if key.endswith("hidden_states") and isinstance(value, (tuple, list)):
            states.extend(value)
        elif key == "last_hidden_state" and isinstance(value, torch.Tensor):
            states.append(value)
    return states


def _capture_outputs(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> list:
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: store.__setitem__(name, out)))
    return handles


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-4,
    hidden_weight: float = 1.0,
    logit_weight: float = 1.0,
    temperature: float = 2.0,
    layer_outputs: bool = False,
    dropout: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Train ``student`` for ``steps`` batches to match ``teacher``; returns the loss of each step.

    loss = ``hidden_weight`` * mean MSE over all hidden states (``output_hidden_states=True``)
    + ``logit_weight`` * ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` when the outputs have logits
    + with ``layer_outputs=True``, the MSE between each compressed module's output and the teacher's module
    of the same name (per-layer matching). ``data`` is cycled: any DataLoader of model-input dicts works.
    The student runs without dropout unless ``dropout=True``: matching a deterministic teacher, dropout
    noise otherwise dominates the loss on small data (measured on a tiny BERT: 8x the signal).
    """
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(parameters, lr=lr)
    device = next(student.parameters()).device
    teacher.eval()
    was_training = student.training
    student.train(dropout)
    config = applied_config(student)
    names = [name for name, entry in (config.modules.items() if config else []) if entry["kind"] != "tied_head"]
    student_outputs: dict[str, torch.Tensor] = {}
    teacher_outputs: dict[str, torch.Tensor] = {}
    handles = []
    if layer_outputs:
        handles = _capture_outputs(student, names, student_outputs) + _capture_outputs(teacher, names, teacher_outputs)
    losses = []
    try:
        for batch in itertools.islice(itertools.cycle(data), steps):
            batch = move_to_device(dict(batch), device)
            with torch.no_grad():
                target = teacher(**batch, output_hidden_states=True)
            output = student(**batch, output_hidden_states=True)
            loss = torch.zeros((), device=device)
            pairs = list(zip(_hidden_states(output), _hidden_states(target)))
            if hidden_weight and pairs:
                loss = loss + hidden_weight * torch.stack([F.mse_loss(s, t) for s, t in pairs]).mean()
            if logit_weight and getattr(output, "logits", None) is not None:
                log_student = F.log_softmax(output.logits / temperature, dim=-1)
                log_teacher = F.log_softmax(target.logits / temperature, dim=-1)
                kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
                loss = loss + logit_weight * temperature**2 * kl
            if layer_outputs:
                loss = loss + torch.stack([F.mse_loss(student_outputs[n], teacher_outputs[n]) for n in names]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for handle in handles:
            handle.remove()
        student.train(was_training)
    return losses
