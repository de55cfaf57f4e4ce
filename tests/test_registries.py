"""One registry per kind: every other list of names (the params schema, Snakemake's wildcards,
the download stage's dispatch) is read from it or, where it cannot be, checked equal here.

Registries: datasets (pipeline/data/datasets.py), backbones (BUILDERS in
pipeline/models/backbones.py), augment policies (pipeline/augment.py; its transforms and options
are the schema's $defs/policy, which validates params.yaml before torch is imported), methods
(pipeline/methods/__init__.py, tests/test_methods.py), fine-tuning modes (MODES in
pipeline/config.py).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import config, methods, params_yaml
from pipeline.augment import TRANSFORMS, PolicyError, resolve_policy
from pipeline.config import ConfigError, from_dict
from pipeline.data import datasets
from pipeline.errors import PipelineError
from pipeline.models import backbones
from pipeline.stages import download, finetune
from tests.conftest import REPO, params_for


def wildcard_constraints() -> dict[str, str]:
    """rules/common.smk's wildcard constraints, evaluated as Snakemake evaluates them."""
    text = (REPO / "rules/common.smk").read_text()
    block = text.split("wildcard_constraints:\n", 1)[1].split("\n\n", 1)[0]
    names = {"datasets": datasets, "methods": methods, "MODES": config.MODES}
    pairs = (line.strip().rstrip(",").split("=", 1) for line in block.splitlines())
    return {name: eval(expression, names) for name, expression in pairs}


# ----------------------------------------------------------------------------------- datasets


def test_every_dataset_list_is_the_registry():
    schema = params_yaml.schema()["properties"]["data"]["properties"]
    assert schema["dataset"]["enum"] == list(datasets.NAMES)
    assert list(schema["mirrors"]["properties"]) == list(datasets.REMOTE)
    assert set(datasets.LOCAL) | set(datasets.REMOTE) == set(datasets.NAMES)


@pytest.mark.parametrize(
    ("wildcard", "names", "outsider"),
    [
        ("dataset", datasets.NAMES, "imagenet"),
        ("method", methods.NAMES, "dino"),
        ("mode", config.MODES, "svm"),
    ],
)
def test_snakemakes_wildcards_match_exactly_the_registry_names(
    wildcard: str, names: tuple[str, ...], outsider: str
):
    regex = wildcard_constraints()[wildcard]
    assert all(re.fullmatch(regex, name) for name in names)
    assert not re.fullmatch(regex, outsider)


def test_every_reader_the_registry_names_is_in_the_download_dispatch():
    assert {spec.reader for spec in datasets.SPECS.values() if not spec.local} == set(
        download.DECODERS
    )
    assert {spec.reader for spec in datasets.SPECS.values() if spec.local} == set(
        download.LOCAL_READERS
    )


def test_params_yaml_has_mirrors_for_every_published_dataset():
    assert set(params_for()["data"]["mirrors"]) == set(datasets.REMOTE)


@pytest.mark.parametrize("name", datasets.NAMES)
def test_a_dataset_needs_data_local_path_exactly_when_the_registry_says_it_is_local(name: str):
    params = params_for(name)
    params["data"]["local_path"] = None
    if datasets.SPECS[name].local:
        with pytest.raises(ConfigError, match=f"data.local_path is empty but .* is '{name}'"):
            from_dict(params)
    else:
        assert from_dict(params).data.dataset == name


def test_a_name_outside_the_registry_is_one_line_before_anything_runs(workdir: Path):
    with pytest.raises(ConfigError, match='data.dataset = "imagenet" is not allowed: must be one'):
        from_dict(params_for("imagenet"))
    config = from_dict(params_for())
    with pytest.raises(PipelineError, match="unknown dataset 'imagenet': must be one of"):
        download.run(config, dataset="imagenet")
    assert not Path("data").exists()


# -------------------------------------------------------------------------------------- modes


def test_every_mode_list_is_config_modes():
    finetune_schema = params_yaml.schema()["properties"]["finetune"]["properties"]
    # semi is a mode (CLI, wildcards, cell names) whose cells finetune.semi lists, not modes
    assert finetune_schema["modes"]["items"]["enum"] == list(config.LABEL_ONLY_MODES)
    assert set(config.LABEL_ONLY_MODES) | set(config.SEMI_SUPERVISED_MODES) == set(config.MODES)
    assert set(finetune_schema["modes"]["default"]) <= set(config.MODES)
    assert finetune_schema["baseline_modes"]["items"]["enum"] == list(config.FROZEN_MODES)
    assert set(config.FROZEN_MODES) | set(config.SEMI_SUPERVISED_MODES) <= set(config.MODES)
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    (mode,) = [action for action in parser._actions if action.dest == "mode"]
    assert tuple(mode.choices) == config.MODES
    # The baselines' own rule (rules/finetune.smk) allows exactly the frozen modes.
    rule = (REPO / "rules/finetune.smk").read_text().split("use rule finetune as", 1)[1]
    assert re.search(r'mode="([^"]*)"', rule).group(1).split("|") == list(config.FROZEN_MODES)


def test_a_mode_outside_the_list_is_one_line_before_anything_runs():
    params = params_for()
    params["finetune"]["modes"] = ["linear", "svm"]
    with pytest.raises(ConfigError, match='finetune.modes.1 = "svm" is not allowed: must be one'):
        from_dict(params)
    params["finetune"]["modes"] = list(config.LABEL_ONLY_MODES)
    assert from_dict(params).finetune.modes == config.LABEL_ONLY_MODES


# ---------------------------------------------------------------------------------- backbones


def test_the_backbone_names_are_the_builders_table():
    assert tuple(backbones.BUILDERS) == backbones.BACKBONES
    assert params_yaml.backbone_names() == list(backbones.BUILDERS)  # read without torch
    schema = params_yaml.schema()["properties"]["model"]["properties"]["backbone"]
    assert schema["enum"] == list(backbones.BACKBONES)
    params = params_for()
    params["model"]["backbone"] = "alexnet"
    with pytest.raises(ConfigError, match='model.backbone = "alexnet" is not allowed: must be one'):
        from_dict(params)


def test_a_backbone_table_the_schema_cannot_read_is_an_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = tmp_path / "backbones.py"
    source.write_text("BUILDERS: dict = {name: None for name in ('mlp', 'vgg')}\n")
    monkeypatch.setattr(params_yaml, "BACKBONES_PATH", source)
    with pytest.raises(RuntimeError, match=f"{source}: no annotated `BUILDERS"):
        params_yaml.backbone_names()


# ---------------------------------------------------------------------------- augment policies

#: Values for the options a transform cannot do without (the rest have defaults).
NEEDED = {"p": 0.5, "degrees": 10.0, "kernel_size": 3}

#: Values tried on every option: inside, on and outside each kind of bound, and wrong types.
PROBES: tuple[Any, ...] = (
    -1.0,
    0,
    0.0,
    0.25,
    0.5,
    1,
    1.0,
    1.5,
    2,
    3,
    4,
    180.0,
    181.0,
    math.inf,
    math.nan,
    True,
    "0.5",
    None,
    [0.2, 0.6],
    [0.6, 0.2],
    [0.0, 0.5],
    [0.5, 2.0],
    [1.0, 1.0],
    [0.5],
    [0.1, 0.2, 0.3],
)


def policy_schema() -> dict[str, Any]:
    return params_yaml.schema()["$defs"]["policy"]


@functools.cache
def policy_validator() -> Any:
    """params.yaml's validator (its keywords and number types) on the schema's policy."""
    defs = params_yaml.schema()["$defs"]
    return params_yaml._validator_class()({"$ref": "#/$defs/policy", "$defs": defs})


def schema_accepts(entry: dict[str, Any], name: str) -> bool:
    """What params.yaml validation says of ``{name: entry}`` as a policy."""
    return policy_validator().is_valid({name: entry})


def python_accepts(entry: dict[str, Any], name: str) -> bool:
    """What the augment module says of ``{name: entry}`` (programmatic callers, policy.json)."""
    try:
        resolve_policy({name: entry})
    except PolicyError:
        return False
    return True


def test_the_schema_lists_the_transforms_in_the_order_they_are_applied():
    assert tuple(policy_schema()["properties"]) == TRANSFORMS


@pytest.mark.parametrize("name", TRANSFORMS)
def test_schema_and_augment_have_the_same_options_requirements_and_defaults(name: str):
    spec = policy_schema()["properties"][name]
    needed = {option: NEEDED[option] for option in spec.get("required", [])}
    resolved = resolve_policy({name: needed})[name]
    assert list(resolved) == list(spec["properties"])
    for option in needed:  # without it, both refuse the transform
        rest = {key: value for key, value in needed.items() if key != option}
        assert not python_accepts(rest, name) and not schema_accepts(rest, name), option
    for option, rule in spec["properties"].items():
        if option not in needed:
            assert "default" in rule, f"{name}.{option} has a default in augment, not in the schema"
            assert np.allclose(resolved[option], rule["default"], rtol=1e-6), f"{name}.{option}"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_schema_and_augment_accept_and_refuse_the_same_values(name: str):
    needed = {
        option: NEEDED[option] for option in policy_schema()["properties"][name].get("required", [])
    }
    disagree = []
    for option in resolve_policy({name: needed})[name]:
        for value in PROBES:
            entry = {**needed, option: value}
            by_schema, by_python = schema_accepts(entry, name), python_accepts(entry, name)
            if by_schema != by_python:
                disagree.append(f"{option}={value!r}: schema {by_schema}, augment {by_python}")
    unknown = {**needed, "strength": 0.5}
    assert not schema_accepts(unknown, name) and not python_accepts(unknown, name)
    assert not disagree, f"{name}: " + "; ".join(disagree)
