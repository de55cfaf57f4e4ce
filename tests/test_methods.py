"""Pretraining methods are plug-ins: one module each, one list of names that everything reads."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest
import torch
import yaml
from torch import nn

import pipeline.methods
from pipeline import methods
from pipeline.cli import build_parser
from pipeline.config import ConfigError, from_dict
from pipeline.models import pretrain as pretrain_models
from tests.conftest import REPO, params_for
from tests.test_pretrain import _module


def test_every_method_module_is_registered_under_its_own_name():
    found = {m.name for m in pkgutil.iter_modules(pipeline.methods.__path__)}
    assert found == set(methods.TRAINED) | {"_registry"}
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
    params[section][key] = [*params[section][key], "byol"]
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*byol.*one of \"scratch\""):
        from_dict(params)


def test_the_generic_module_trains_a_method_it_has_never_seen(monkeypatch: pytest.MonkeyPatch):
    """A new method is a module with heads() and objective(); PretrainModule needs no change."""

    def heads(dim, options, width, in_channels, image_size):
        return {"head": nn.Linear(dim, in_channels * image_size * image_size)}

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
    with pytest.raises(ValueError, match="unknown pretraining method 'byol'"):
        _module("byol", {})


def test_vae_pictures_are_uint8_grids_of_the_names_it_declares():
    vae = importlib.import_module("pipeline.methods.vae")
    module = _module("vae", {"latent_dim": 4, "beta": 1.0})
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    grids = module.pictures(images, 6, seed=0)
    assert tuple(grids) == vae.PICTURES
    assert all(g.dtype == torch.uint8 and g.shape == (6, 1, 16, 16) for g in grids.values())
    assert torch.equal(grids["originals"], images)
    assert torch.equal(module.pictures(images, 6, seed=0)["samples"], grids["samples"])
