"""params.yaml is validated in one place; every mistake is one line naming key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import paths
from pipeline.config import ConfigError, from_dict, load
from tests.conftest import REPO, params_for, run, write_params


def test_the_repository_params_are_valid_and_typed():
    config = load(REPO / "params.yaml")
    assert config.data.dataset == "fashion_mnist"
    assert config.split.budgets == tuple(sorted(config.split.budgets, key=paths.budget_size))
    assert config.data.mirrors_for("fashion_mnist")[0] == "/usr/share/datasets/fashion-mnist"


def test_missing_optional_keys_take_the_schema_defaults():
    policies = {"ssl": {}, "supervised": {}}
    config = from_dict({"data": {"dataset": "mnist"}, "augment": {"policies": policies}})
    assert config.split.val_fraction == 0.1
    assert config.split.label_fractions == (0.01, 0.1, 1.0)
    assert config.data.channels == 1
    assert config.augment.offline_copies == 0 and config.augment.offline_policy == "supervised"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("split", "val_fraction", 1.5, "split.val_fraction = 1.5 is not allowed: must be at most"),
        ("split", "val_fraction", 0, "split.val_fraction = 0 is not allowed: must be greater than"),
        ("split", "seed", "x", 'split.seed = "x" is not allowed: must be of type integer'),
        ("split", "label_fractions", [0.1, 2], "split.label_fractions.1 = 2 is not allowed"),
        ("split", "label_fractions", [], "must be a list of at least 1"),
        ("data", "dataset", "imagenet", 'data.dataset = "imagenet" is not allowed: must be one of'),
        ("data", "channels", 2, "data.channels = 2 is not allowed: must be one of 1, 3"),
        ("split", "val_fracton", 0.1, "unknown key split.val_fracton; allowed here:"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(section, key, value, expected):
    params = params_for()
    if key == "label_fractions":  # params.yaml's grid is per class: the two are exclusive
        params["split"]["labels_per_class"] = None
    params[section][key] = value
    with pytest.raises(ConfigError) as err:
        from_dict(params)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_local_datasets_need_a_folder():
    with pytest.raises(ConfigError, match="data.local_path is empty but data.dataset is 'idx'"):
        from_dict(params_for("idx"))


def test_a_missing_required_key_is_named_and_missing_sections_take_defaults():
    params = params_for()
    del params["data"]
    with pytest.raises(ConfigError, match="missing key data.dataset"):
        from_dict(params)
    params = params_for()
    del params["split"], params["pretrain"]["monitor"]
    # the split's defaults are label fractions: fine-tuning asks for those
    params["finetune"]["fractions"] = [0.01, 0.1, 1.0]
    params["finetune"]["semi"]["fractions"] = []
    config = from_dict(params)
    assert config.split.val_fraction == 0.1 and config.pretrain.monitor["knn_ks"] == [5, 10, 20, 50]


def test_yaml_syntax_errors_name_the_line(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  dataset: [fashion_mnist\nsplit: {}\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML at line \d+"):
        load(path)


def test_the_cli_prints_one_line_and_no_traceback(tmp_path: Path):
    params = params_for()
    params["split"]["val_fraction"] = 1.5
    write_params(tmp_path, params)
    result = run(["python", "-m", "pipeline", "split"], tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: params.yaml: split.val_fraction = 1.5 is not allowed: must be at most 0.5"
    ]


def test_snakemake_rejects_the_same_mistake_in_one_line(tmp_path: Path):
    for name in ("Snakefile", "rules", "schemas"):
        source = REPO / name
        target = tmp_path / name
        if source.is_dir():
            import shutil

            shutil.copytree(source, target)
        else:
            target.write_text(source.read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dataset"] = "imagenet"
    write_params(tmp_path, params)
    result = run(["snakemake", "-n"], tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        'error: params.yaml: data.dataset = "imagenet" is not allowed: must be one of '
        '"fashion_mnist", "mnist", "cifar10", "stl10", "idx", "imagefolder"'
    ]


def test_label_fractions_are_written_as_floats_because_they_name_files():
    params = params_for()
    params["split"].update(label_fractions=[0.1, 1], labels_per_class=None)
    with pytest.raises(ConfigError, match=r"split.label_fractions.1 = 1 .*float \(1.0, not 1\)"):
        from_dict(params)


def test_fine_tuning_asks_only_for_what_split_and_pretraining_make():
    params = params_for()
    params["finetune"]["fractions"] = [0.5]
    with pytest.raises(ConfigError, match="finetune.fractions has 0.5, which the split stage"):
        from_dict(params)
    params = params_for()
    params["pretrain"]["methods"] = ["simclr"]
    params["finetune"]["inits"] = ["simclr", "vae"]
    with pytest.raises(ConfigError, match="finetune.inits has 'vae' but pretrain.methods"):
        from_dict(params)
