"""The training-hook protocol: modules with ``on_train_step`` are found, called in order and their metrics logged."""

from types import SimpleNamespace

import torch
from torch import nn
from transformers import TrainerControl

import kron_transformers as kt


class CountingLayer(nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.calls: list[tuple[int, object]] = []

    def on_train_step(self, step, optimizer):
        self.calls.append((step, optimizer))
        return {"calls": len(self.calls)}


class SilentLayer(nn.Linear):
    def on_train_step(self, step, optimizer):
        return None


def test_on_train_step_calls_every_hooked_module_and_prefixes_metrics():
    model = nn.Sequential(CountingLayer(), nn.ReLU(), nn.Sequential(CountingLayer(), SilentLayer(2, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert [name for name, _ in kt.training.modules_with_training_hooks(model)] == ["0", "2.0", "2.1"]
    assert kt.on_train_step(model, 0, optimizer) == {"0.calls": 1.0, "2.0.calls": 1.0}
    assert kt.on_train_step(model, 1, optimizer) == {"0.calls": 2.0, "2.0.calls": 2.0}
    assert model[0].calls == [(0, optimizer), (1, optimizer)]


def test_a_hooked_root_module_logs_unprefixed_metrics():
    assert kt.on_train_step(CountingLayer(), 7) == {"calls": 1.0}


def test_trainer_callback_passes_the_global_step_and_adds_metrics_to_logs():
    model = nn.Sequential(CountingLayer())
    callback = kt.KronTrainingCallback()
    state = SimpleNamespace(global_step=5)
    callback.on_step_end(None, state, TrainerControl(), model=model, optimizer="opt")
    assert model[0].calls == [(5, "opt")]
    logs = {"loss": 1.5}
    callback.on_log(None, state, TrainerControl(), logs=logs)
    assert logs == {"loss": 1.5, "0.calls": 1.0}
