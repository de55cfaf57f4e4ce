"""BYOL and the momentum teacher the generic module keeps for any method that declares one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.config import from_dict
from pipeline.methods.byol import normalized_mse
from pipeline.models.pretrain import PretrainModule
from pipeline.stages import pretrain
from tests.test_pretrain import METHOD_OPTIONS, StopAtEpoch, _module, prepared_tiny, tiny_params

__all__ = ["prepared_tiny"]  # a fixture, imported for the resume test


def byol(**options: float):
    torch.manual_seed(0)
    return _module("byol", {**METHOD_OPTIONS["byol"], **options})


def images(count: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (count, 1, 16, 16), dtype=torch.uint8)


def test_the_loss_is_0_for_identical_directions_and_4_for_opposite_ones():
    p = torch.randn(8, 5)
    assert normalized_mse(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_mse(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    orthogonal = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert normalized_mse(*orthogonal).item() == pytest.approx(2.0)


def test_the_teacher_starts_as_the_student_and_copies_exactly_what_it_declares():
    module = byol()
    assert set(module.teacher) == {"backbone", "head"}  # the encoder and the projector
    for name in ("backbone", "head"):
        student, teacher = getattr(module, name).state_dict(), module.teacher[name].state_dict()
        assert student.keys() == teacher.keys()
        assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert _module("simclr", METHOD_OPTIONS["simclr"]).teacher.keys() == set()


def test_the_teacher_gets_no_gradient_and_no_optimizer():
    module = byol()
    loss, _, _ = module.objective(images(), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert any(p.grad is not None for p in module.backbone.parameters())
    optimizer = module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    assert {id(p) for p in module.predictor.parameters()} <= optimized


def test_the_ema_update_equals_the_hand_computation():
    module = byol()
    with torch.no_grad():  # the student moves away from its teacher
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p))
    teacher = [p.clone() for p in module.teacher["backbone"].parameters()]
    student = [p.clone() for p in module.backbone.parameters()]
    module.update_teacher(0.9)
    for before, s, after in zip(
        teacher, student, module.teacher["backbone"].parameters(), strict=True
    ):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * s, rtol=0, atol=1e-6)
    assert not torch.equal(after, before)


def test_the_momentum_follows_a_cosine_from_base_to_final():
    module = byol(momentum_base=0.99, momentum_final=1.0)
    module.hparams.epochs, module.hparams.steps_per_epoch = 2, 51  # 102 steps: 0 .. 101
    assert module.momentum(0) == pytest.approx(0.99)
    assert module.momentum(101) == pytest.approx(1.0)
    middle = 0.99 + (1.0 - 0.99) * (1 - math.cos(math.pi * 50 / 101)) / 2
    assert module.momentum(50) == pytest.approx(middle)
    assert 0.99 < module.momentum(25) < module.momentum(75) < 1.0


def test_a_method_declaring_a_teacher_needs_its_momentum_in_params():
    with pytest.raises(ValueError, match="pretrain.byol has no momentum_base"):
        _module("byol", {"projection_dim": 8, "projection_hidden": 16})


def test_training_moves_the_teacher_and_the_checkpoint_brings_it_back(prepared_tiny: Path):
    params = tiny_params(prepared_tiny, epochs=3, max_images=128)
    params["pretrain"]["methods"].append("byol")
    params["pretrain"]["byol"].update(momentum_base=0.9)  # a teacher that visibly moves
    config = from_dict(params)
    with pytest.raises(RuntimeError, match="interrupted"):
        pretrain.run(config, method="byol", callbacks=(StopAtEpoch(2),))
    (checkpoint,) = Path("checkpoints/pretrain").glob("byol-*/last.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    state = saved["state_dict"]
    teacher = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    assert {k.partition(".")[0] for k in teacher} == {"backbone", "head"}
    weights = [k for k in teacher if k.endswith("weight")]
    assert any(not torch.equal(teacher[k], state[k]) for k in weights)  # it lags the student

    fresh = PretrainModule(**saved["hyper_parameters"])  # what a resumed run starts from
    fresh.load_state_dict(state)
    for key, value in fresh.teacher.state_dict().items():
        assert torch.equal(value, teacher[key]), key
