"""Optimiser and learning-rate schedule from the plan's training section."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

EXPONENTIAL_GAMMA = 0.98  # the "exponential" schedule's decay per epoch (H3DE-Net's) ...
EXPONENTIAL_FLOOR = 0.03  # ... which stops once the rate is this share of the base rate


def build_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    momentum: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW (default), Adam (L2 weight decay added to the gradient, as H3DE-Net trains) or SGD
    with Nesterov momentum; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
    if name == "adam":
        return torch.optim.Adam(groups, lr=learning_rate, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer '{name}' (adamw, adam or sgd)")


def learning_rate_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str, decay_epochs: float = 1.0
) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then the decay, which
    spans ``decay_epochs`` epochs (only the exponential decay counts them)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return decay_factor(progress, schedule, decay_epochs)


def time_learning_rate_factor(
    used: float, warmup: float, schedule: str, decay_epochs: float = 1.0
) -> float:
    """The same schedule over the share ``used`` (0-1) of a time budget: linear warm-up over
    the first ``warmup`` of it, then the decay over the rest."""
    if used < warmup:
        return max(used / warmup, 1e-3)
    progress = min(1.0, (used - warmup) / max(1e-9, 1.0 - warmup))
    return decay_factor(progress, schedule, decay_epochs)


def decay_factor(progress: float, schedule: str, decay_epochs: float = 1.0) -> float:
    """The decay after warm-up at ``progress`` (0-1) through it: cosine, poly (exponent 0.9), or
    exponential (x 0.98 per epoch of the ``decay_epochs``, down to 3 % of the base rate)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "exponential":
        return max(EXPONENTIAL_GAMMA ** (progress * decay_epochs), EXPONENTIAL_FLOOR)
    raise ValueError(f"unknown schedule '{schedule}' (cosine, poly or exponential)")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    used_share: Callable[[], float] | None = None,
    decay_epochs: float = 1.0,
):
    """A per-step LambdaLR over :func:`learning_rate_factor`; with ``used_share`` (the share of
    a time budget used so far) over :func:`time_learning_rate_factor` instead, warming up for
    the same share of the run."""
    if used_share is None:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: learning_rate_factor(
                step, total_steps, warmup_steps, schedule, decay_epochs
            ),
        )
    warmup = warmup_steps / max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda _: time_learning_rate_factor(used_share(), warmup, schedule, decay_epochs),
    )
