"""The contract between a pretraining method's module and the generic Lightning module, as code.

A method is a module, ``pipeline/methods/<name>.py``. :class:`Method` lists what every method
has; the optional hooks come in groups (:data:`OPTIONAL`), each all-or-nothing, so a method
that has ``configure_optimizers`` but misspells ``training_step`` is refused. :func:`check`
runs on every method when ``pipeline.methods._registry`` imports them, so a misspelt hook, a
hook with other parameters, or an unknown upper-case constant fails at import, naming the
method, the name and the nearest hook, instead of being silently ignored until epoch 3.

What a method may touch of the module that trains it is :class:`Context`: the encoder, its own
heads (by the names its ``heads()`` returns), the teacher copies it declared, the augmentation,
the step and the world size. ``tests/test_methods.py`` reads every hook's source and fails on
any other attribute, so a method never reaches into private Lightning state.

Imported by ``pipeline.methods._registry`` (torch is loaded there already); typing only, no
Lightning import.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Build:
    """What ``heads()`` may build from: the encoder itself, its feature size, the method's
    params section (``pretrain.<name>``) and the images' shape (for decoders and generators)."""

    backbone: nn.Module
    dim: int
    options: Mapping[str, Any]
    width: int
    in_channels: int
    image_size: int


class Context(Protocol):
    """The generic module as a method sees it (``pipeline.models.pretrain.PretrainModule``).

    Attributes a method's heads() registered (``head``, ``decoder``, ``projector``, ...) are
    reachable by their names too; nothing else is part of the contract.
    """

    backbone: nn.Module
    #: Teacher copies of the modules named in the method's ``TEACHER``, by those names: no
    #: gradient, no optimizer, moved by EMA after every optimizer step, saved in checkpoints.
    teacher: nn.ModuleDict
    probe: nn.Linear
    options: Mapping[str, Any]
    hparams: Any  # Lightning's AttributeDict of the constructor's arguments (seed, monitor, ...)
    images: dict[str, torch.Tensor]  # uint8 images of each split, on the device
    epoch_pictures: list[torch.Tensor]
    device: torch.device
    current_epoch: int

    @property
    def step(self) -> int | None:
        """Optimizer steps taken so far; None outside a Trainer (fine-tuning's multi-task term)."""
        ...

    @property
    def world_size(self) -> int:
        """Processes training together (1 outside a Trainer)."""
        ...

    @property
    def is_global_zero(self) -> bool: ...

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def normalize(self, images: torch.Tensor) -> torch.Tensor: ...

    def to_model_layout(self, x: torch.Tensor) -> torch.Tensor: ...

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor: ...

    def every_row(self, images: torch.Tensor) -> torch.Tensor: ...

    def probe_loss(
        self, features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def track(self, **values: torch.Tensor) -> None: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def optimizers(self) -> Any: ...  # manual optimization only (OwnOptimization)

    def manual_backward(self, loss: torch.Tensor) -> None: ...


#: What an objective returns: the method's loss, the encoder's features of the first view
#: (for the online probe) and which rows of the batch the probe may learn from.
Objective = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@runtime_checkable
class Method(Protocol):
    """What every trained method's module has."""

    NAME: str

    @staticmethod
    def heads(build: Build) -> dict[str, nn.Module]:
        """The modules it adds beside the encoder, by attribute name, built in this order (a
        seed gives the same weights)."""
        ...

    @staticmethod
    def objective(
        module: Context, images: torch.Tensor, view: torch.Tensor, generator: torch.Generator
    ) -> Objective:
        """The loss for a batch of uint8 ``images`` whose first augmented ``view`` the generic
        module has drawn already."""
        ...


def _pictures(module: Context, images: torch.Tensor, count: int, seed: int) -> dict: ...
def _configure_optimizers(module: Context) -> Any: ...
def _training_step(
    module: Context, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor: ...
def _epoch_end(module: Context) -> dict[str, float]: ...


#: The optional hooks, in groups that go together. A name maps to a function whose parameters
#: the hook must have, or to the type of a constant.
OPTIONAL: dict[str, dict[str, Callable[..., Any] | type | tuple[type, ...]]] = {
    # uint8 picture grids saved beside the encoder (<name>.npy), shown in the report under
    # PICTURES_CAPTION; SAMPLES (optional) names the grid of the model's own samples.
    "pictures": {"pictures": _pictures, "PICTURES": tuple, "PICTURES_CAPTION": str},
    "samples": {"SAMPLES": str},
    # Several optimizers, stepped by the method itself (Lightning's manual optimization); the
    # step returns the loss to report as train_loss.
    "own optimization": {
        "configure_optimizers": _configure_optimizers,
        "training_step": _training_step,
    },
    # Extra per-epoch monitors for the curves CSV, and the columns the report plots.
    "epoch monitors": {"epoch_end": _epoch_end},
    "curves": {"CURVES": tuple},
    # Teacher copies, by name (the encoder is "backbone", a head its heads() name): the generic
    # module builds them and moves them by EMA with a cosine momentum schedule from the method's
    # momentum_base to momentum_final (its params section).
    "teacher": {"TEACHER": tuple},
}
#: Every name the contract knows: the required ones and every optional hook.
HOOKS: frozenset[str] = frozenset(
    {"NAME", "heads", "objective"} | {name for group in OPTIONAL.values() for name in group}
)
_REQUIRED: dict[str, Callable[..., Any] | type] = {
    "NAME": str,
    "heads": Method.heads,
    "objective": Method.objective,
}


class ContractError(TypeError):
    """A method's module does not keep the contract; the message names the method and the fix."""


def _parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def _check_member(method: str, name: str, value: Any, expected: Any) -> None:
    if isinstance(expected, (type, tuple)):
        if not isinstance(value, expected):
            raise ContractError(
                f"method {method!r}: {name} must be a {getattr(expected, '__name__', expected)}, "
                f"got {type(value).__name__}"
            )
        return
    if not callable(value):
        raise ContractError(f"method {method!r}: {name} must be a function")
    want, have = _parameters(expected), _parameters(value)
    if have != want:
        raise ContractError(
            f"method {method!r}: {name}({', '.join(have)}) must take ({', '.join(want)}) "
            "(pipeline/methods/_contract.py)"
        )


def _own_names(source: str) -> list[str]:
    """Public names a module's own top-level statements define (not what it imports)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [name for name in names if not name.startswith("_")]


def check(module: ModuleType, source: str | None = None) -> None:
    """Raise :class:`ContractError` unless ``module`` keeps the method contract.

    ``source``: the module's text (read from its file when not given), for the names it defines.
    """
    method = module.__name__.rpartition(".")[2]
    for name, expected in _REQUIRED.items():
        if not hasattr(module, name):
            raise ContractError(f"method {method!r} has no {name}: every method needs one")
        _check_member(method, name, getattr(module, name), expected)
    if method != module.NAME:
        raise ContractError(f"method {method!r}: NAME is {module.NAME!r}; it must be the file's")
    for group, members in OPTIONAL.items():
        present = [name for name in members if hasattr(module, name)]
        if present and len(present) < len(members):
            missing = sorted(set(members) - set(present))
            raise ContractError(
                f"method {method!r} has {', '.join(present)} but not {', '.join(missing)}: the "
                f"{group} hooks go together"
            )
        for name in present:
            _check_member(method, name, getattr(module, name), members[name])
    for name in _own_names(inspect.getsource(module) if source is None else source):
        if name in HOOKS:
            continue
        near = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.8)
        if near:
            raise ContractError(
                f"method {method!r} defines {name!r}, which is no hook: did you mean {near[0]!r}? "
                "(rename it, or start a helper's name with _)"
            )
        if name.isupper():
            raise ContractError(
                f"method {method!r} defines the constant {name!r}, which the contract does not "
                f"know (it knows {', '.join(sorted(n for n in HOOKS if n.isupper()))}); make it "
                "private (_NAME) or add it to pipeline/methods/_contract.py"
            )
