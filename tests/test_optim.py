"""Optimizers of the course and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.optim import build_optimizer, warmup_cosine, warmup_cosine_scheduler


@pytest.mark.parametrize(
    ("name", "lr"),
    [("sgd", 0.1), ("adam", 0.1), ("adamw", 0.1), ("rmsprop", 0.01), ("adagrad", 1.0)],
)
def test_every_optimizer_minimizes_a_quadratic(name: str, lr: float):
    weight = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    optimizer = build_optimizer([{"params": [weight]}], name, lr=lr, weight_decay=0.0)
    for _ in range(200):
        optimizer.zero_grad()
        (weight**2).sum().backward()
        optimizer.step()
    assert weight.detach().abs().max() < 0.5


def test_sgd_uses_nesterov_momentum_and_groups_keep_their_own_settings():
    weight, probe = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer(
        [{"params": [weight]}, {"params": [probe], "lr": 0.5, "weight_decay": 0.0}],
        "sgd",
        lr=0.1,
        weight_decay=1e-4,
        momentum=0.9,
        nesterov=True,
    )
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]


def test_an_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.ones(1))]}], "lbfgs", 0.1, 0.0)


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=14) for step in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert factors[14] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_the_scheduler_applies_the_factor_to_every_group():
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = build_optimizer([{"params": [weight]}], "adamw", lr=0.2, weight_decay=0.0)
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=2, total_steps=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
