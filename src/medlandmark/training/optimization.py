"""Optimiser and learning-rate schedule from the plan's training section."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, name: str, learning_rate: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with Nesterov momentum; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer '{name}' (adamw or sgd)")


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then cosine or poly."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return decay_factor(progress, schedule)


def time_learning_rate_factor(used: float, warmup: float, schedule: str) -> float:
    """The same schedule over the share ``used`` (0-1) of a time budget: linear warm-up over
    the first ``warmup`` of it, then the decay over the rest."""
    if used < warmup:
        return max(used / warmup, 1e-3)
    return decay_factor(min(1.0, (used - warmup) / max(1e-9, 1.0 - warmup)), schedule)


def decay_factor(progress: float, schedule: str) -> float:
    """The decay after warm-up at ``progress`` (0-1) through it: cosine, or poly (exponent 0.9)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    raise ValueError(f"unknown schedule '{schedule}' (cosine or poly)")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    used_share: Callable[[], float] | None = None,
):
    """A per-step LambdaLR over :func:`learning_rate_factor`; with ``used_share`` (the share of
    a time budget used so far) over :func:`time_learning_rate_factor` instead, warming up for
    the same share of the run."""
    if used_share is None:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps, schedule)
        )
    warmup = warmup_steps / max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: time_learning_rate_factor(used_share(), warmup, schedule)
    )
