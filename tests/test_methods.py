"""Pretraining methods are plug-ins: one module each, one list of names that everything reads."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest
import torch
import yaml
from torch import nn

import pipeline.methods
from pipeline import methods
from pipeline.cli import build_parser
from pipeline.config import ConfigError, from_dict
from pipeline.methods import _contract as contract
from pipeline.models import pretrain as pretrain_models
from tests.conftest import REPO, params_for
from tests.test_pretrain import METHOD_OPTIONS, _module


def test_every_method_module_is_registered_under_its_own_name():
    found = {m.name for m in pkgutil.iter_modules(pipeline.methods.__path__)}
    assert found == set(methods.TRAINED) | {"_registry", "_contract"}
    assert tuple(pretrain_models.IMPLEMENTATIONS) == methods.TRAINED
    for name, module in pretrain_models.IMPLEMENTATIONS.items():
        assert module.NAME == name == module.__name__.rpartition(".")[2]
        assert callable(module.heads) and callable(module.objective)
        if hasattr(module, "pictures"):  # a method with pictures names them for the report
            assert module.PICTURES and module.PICTURES_CAPTION


def test_the_names_are_one_list_for_params_schema_cli_and_snakemake():
    assert set(methods.NAMES) == set(methods.TRAINED) | set(methods.REFERENCES)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(methods.NAMES) <= set(params["pretrain"])  # a params section per method
    pretrain_cli = build_parser("pretrain")._subparsers._group_actions[0].choices["pretrain"]
    method_option = next(a for a in pretrain_cli._actions if a.dest == "method")
    assert tuple(method_option.choices) == methods.NAMES
    common = (REPO / "rules/common.smk").read_text()
    assert 'method="|".join(methods.NAMES)' in common  # Snakemake's wildcard reads the list


def test_every_method_module_is_a_code_dependency_of_pretraining():
    """The registry imports the modules by name; the derived code dependencies still list them."""
    from pipeline import dag

    code = dag.code("pretrain")
    assert {f"pipeline/methods/{name}.py" for name in methods.TRAINED} <= set(code)
    assert "pipeline/methods/_registry.py" in code
    assert not any(
        f.startswith("pipeline/methods/") and not f.endswith("__init__.py")
        for f in dag.code("split")
    )


@pytest.mark.parametrize("key", ["methods", "inits"])
def test_a_name_not_in_the_list_is_one_error_naming_the_key_and_the_choices(key: str):
    params = params_for()
    section = "pretrain" if key == "methods" else "finetune"
    params[section][key] = [*params[section][key], "dino"]
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*dino.*one of \"scratch\""):
        from_dict(params)


def test_the_generic_module_trains_a_method_it_has_never_seen(monkeypatch: pytest.MonkeyPatch):
    """A new method is a module with heads() and objective(); PretrainModule needs no change."""

    def heads(build):
        return {"head": nn.Linear(build.dim, build.in_channels * build.image_size**2)}

    def objective(module, images, view, generator):  # predict the view's pixels from features
        features = module.backbone(view)
        loss = nn.functional.mse_loss(module.head(features).float(), view.flatten(1).float())
        return loss, features, module.every_row(images)

    toy = types.SimpleNamespace(NAME="toy", heads=heads, objective=objective)
    monkeypatch.setitem(pretrain_models.IMPLEMENTATIONS, "toy", toy)
    torch.manual_seed(0)
    module = _module("toy", {})
    assert isinstance(module.head, nn.Linear)  # the method's head, registered by its name
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        return module.objective(images, torch.Generator().manual_seed(1))[0]

    before = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * before
    assert module.pictures(images[:4], 4, 0) == {}  # no pictures() in the module: none


def test_an_unregistered_method_is_refused_by_the_module():
    with pytest.raises(ValueError, match="unknown pretraining method 'dino'"):
        _module("dino", {})


def test_vae_pictures_are_uint8_grids_of_the_names_it_declares():
    vae = importlib.import_module("pipeline.methods.vae")
    module = _module("vae", {"latent_dim": 4, "beta": 1.0})
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    grids = module.pictures(images, 6, seed=0)
    assert tuple(grids) == vae.PICTURES
    assert all(g.dtype == torch.uint8 and g.shape == (6, 1, 16, 16) for g in grids.values())
    assert torch.equal(grids["originals"], images)
    assert torch.equal(module.pictures(images, 6, seed=0)["samples"], grids["samples"])


# ------------------------------------------------------------------ the contract, as code


def fake_method(**members) -> types.ModuleType:
    """A method module made in memory, with SimCLR's heads and objective unless overridden."""
    simclr = pretrain_models.IMPLEMENTATIONS["simclr"]
    module = types.ModuleType("pipeline.methods.fake")
    module.NAME = "fake"
    module.heads, module.objective = simclr.heads, simclr.objective
    for name, value in members.items():
        setattr(module, name, value)
    return module


def test_every_method_keeps_the_contract():
    for module in pretrain_models.IMPLEMENTATIONS.values():
        assert isinstance(module, contract.Method)
        contract.check(module)  # what the registry does when it imports them


def _epoch_end(module):
    return {}


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"epoch_ends": _epoch_end}, "'epoch_ends', which is no hook: did you mean 'epoch_end'"),
        ({"PICTURE": ("samples",)}, "did you mean 'PICTURES'"),
        ({"configure_optimizers": _epoch_end}, "but not training_step: the own optimization"),
        ({"epoch_end": lambda m, extra: {}}, r"epoch_end\(m, extra\) must take \(module\)"),
        ({"TEACHER": "backbone"}, "TEACHER must be a tuple"),
        ({"WARMUP": 3}, "the constant 'WARMUP', which the contract does not know"),
    ],
)
def test_a_misspelt_or_misshapen_hook_fails_when_the_method_is_imported(members, message):
    source = "".join(f"{name} = ...\n" for name in members)  # the names its file defines
    with pytest.raises(contract.ContractError, match=message):
        contract.check(fake_method(**members), source=f"NAME = 'fake'\n{source}")


def test_a_method_without_objective_is_refused():
    module = fake_method()
    del module.objective
    with pytest.raises(contract.ContractError, match="'fake' has no objective"):
        contract.check(module, source="NAME = 'fake'\n")


def _attributes_used(function) -> set[str]:
    """Attributes the function reads from its first parameter (the generic module)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    first = definition.args.args[0].arg
    return {
        node.attr
        for node in ast.walk(definition)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == first
    }


def test_methods_touch_only_the_context_and_their_own_heads():
    """No private attribute, no Lightning internals: only what _contract.Context declares."""
    allowed = {n for n in dir(contract.Context) if not n.startswith("_")}
    allowed |= set(contract.Context.__annotations__)
    module = _module("simclr", METHOD_OPTIONS["simclr"])
    assert all(hasattr(module, name) for name in allowed)  # PretrainModule keeps the Context
    for name, method in pretrain_models.IMPLEMENTATIONS.items():
        heads = method.heads(contract.Build(module.backbone, 120, METHOD_OPTIONS[name], 8, 1, 16))
        for function in vars(method).values():
            if not inspect.isfunction(function) or function.__module__ != method.__name__:
                continue
            parameters = list(inspect.signature(function).parameters)
            if not parameters or parameters[0] != "module":
                continue
            unknown = _attributes_used(function) - allowed - set(heads)
            assert not unknown, f"{name}.{function.__name__} uses {unknown}"
