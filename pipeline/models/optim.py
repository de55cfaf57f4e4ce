"""Optimizers of the course (SGD with momentum, RMSProp, Adagrad, Adam/AdamW) and the schedule.

The schedule is a linear warm-up followed by cosine decay to zero, stepped every batch: large
learning rates at the start of contrastive training diverge without warm-up (Goyal et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def build_optimizer(
    groups: Iterable[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """One optimizer over parameter groups; a group may override ``lr`` and ``weight_decay``.

    SGD, Adam, RMSProp and Adagrad add weight decay as an L2 term of the gradient (the course's
    ``λ R(θ)`` with ``R = ½ Σ θ²``); AdamW decouples it (Loshchilov & Hutter 2019).
    """
    groups = list(groups)
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
        )
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam, adamw, rmsprop or adagrad")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at ``step``: linear from 1/warmup to 1, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
