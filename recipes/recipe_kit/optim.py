"""Optimizers and schedules of the presets: LAMB and the inverse square-root schedule.

Panahi, section 4.4.1 trains T5-small (Table 5) with "LAMB optimizer with inverse square root scheduler,
dropout 0.1, no weight decay, and 0.1 label-smoothed cross entropy loss".
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from .arguments import TrainArguments


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., *Large Batch Optimization for Deep Learning*, ICLR 2020, Algorithm 2).

    Per parameter tensor: Adam moments ``m, v`` with bias correction, the update ``u = m_hat / (sqrt(v_hat) + eps)
    + weight_decay * p``, then a layer-wise trust ratio ``phi = ||p|| / ||u||`` (1 when either norm is 0):
    ``p <- p - lr * phi * u``. A parameter group with ``layer_adaptation=False`` takes the plain step (``phi = 1``):
    ``build_optimizer`` puts biases there, as BERT's LAMB and apex's ``FusedLAMB`` do, because a tensor that starts
    at zero would otherwise only grow by a factor ``1 + lr`` per step after its first one.
    """

    def __init__(
        self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay=0.0
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(
                f"Lamb: need lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1); got lr={lr}, eps={eps}, "
                f"weight_decay={weight_decay}, betas={betas}"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, layer_adaptation=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                step_size = group["lr"]
                if group.get("layer_adaptation", True):  # absent from the groups of checkpoints saved before it
                    weight_norm, update_norm = p.norm(), update.norm()
                    step_size = step_size * torch.where(
                        (weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0
                    )
                p.sub_(step_size * update)
        return loss


def inverse_sqrt_factor(step: int, warmup_steps: int) -> float:
    """fairseq's ``inverse_sqrt``: linear warm-up to 1 over ``warmup_steps``, then ``sqrt(warmup_steps / step)``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return math.sqrt(warmup_steps / max(step, 1))


def build_optimizer(model: torch.nn.Module, args: TrainArguments) -> torch.optim.Optimizer:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if args.optimizer == "lamb":
        biases = [p for name, p in trainable if name.rsplit(".", 1)[-1] == "bias"]
        weights = [p for name, p in trainable if name.rsplit(".", 1)[-1] != "bias"]
        groups = [{"params": weights}, {"params": biases, "layer_adaptation": False}]
        groups = [group for group in groups if group["params"]]
        return Lamb(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.AdamW([p for _, p in trainable], lr=args.learning_rate, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArguments, total_steps: int) -> LambdaLR:
    """The learning-rate factor per optimizer step: inverse square root, linear decay, or constant (after warm-up)."""
    warmup = args.warmup_steps

    def factor(step: int) -> float:
        if args.lr_scheduler == "inverse_sqrt":
            return inverse_sqrt_factor(step, warmup)
        if step < warmup:
            return (step + 1) / warmup
        if args.lr_scheduler == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        return 1.0

    return LambdaLR(optimizer, factor)
