"""Training-time hooks of the compressed layers (ARCHITECTURE.md layer 7).

Some methods need work between optimizer steps: TT-Rec's cache warm-up and repopulation
(Yin et al., section 4.2), CCE's re-clustering (Tsang & Ahle, Algorithm 1). A module that needs
it defines

```py
def on_train_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, float] | None
```

called once after every ``optimizer.step()``; it returns metrics to log (e.g. a cache hit
rate) or ``None``. ``on_train_step(model, step, optimizer)`` calls every such module of a
model; ``KronTrainingCallback`` does the same inside ``transformers.Trainer``, and an
Accelerate loop calls the function directly.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback


def modules_with_training_hooks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that define ``on_train_step``."""
    modules = model.named_modules()
    return [(name, module) for name, module in modules if callable(getattr(module, "on_train_step", None))]


def on_train_step(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Run every module's ``on_train_step(step, optimizer)``; metrics come back as ``{"module.metric": value}``."""
    metrics: dict[str, float] = {}
    for name, module in modules_with_training_hooks(model):
        for key, value in (module.on_train_step(step, optimizer) or {}).items():
            metrics[f"{name}.{key}" if name else key] = float(value)
    return metrics


class KronTrainingCallback(TrainerCallback):
    """Calls ``on_train_step`` after each optimizer step of ``transformers.Trainer`` and logs its metrics."""

    def __init__(self) -> None:
        self.last_metrics: dict[str, float] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.last_metrics = on_train_step(model, state.global_step, optimizer)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update(self.last_metrics)
        return control
