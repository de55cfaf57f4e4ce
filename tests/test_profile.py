"""A profile is a small overlay of params.yaml keys; `python -m pipeline profile` merges it in."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load
from pipeline.profile import apply
from tests.conftest import REPO, run


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """A copy of the repository's params.yaml to apply profiles to."""
    return Path(shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml"))


def overlay(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return path


def profile_cli(
    profile: Path, params: Path, *flags: str, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m pipeline profile PROFILE [FLAGS] --params PARAMS``, as a user types it."""
    command = ["python", "-m", "pipeline", "profile", str(profile), *flags, "--params", str(params)]
    return run(command, REPO, check=check)


def leaves(value: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, sub in value.items():
        if isinstance(sub, dict):
            out |= leaves(sub, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = sub
    return out


def test_the_gpu_profile_is_a_small_overlay_whose_every_key_changes_a_value():
    gpu = yaml.safe_load((REPO / "params.gpu.yaml").read_text())
    default = leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    changed = leaves(gpu)
    # Small: a few dozen values (its comments, which say why and how long, do not count).
    assert len(changed) < 40
    assert changed.keys() <= default.keys()
    assert all(default[key] != value for key, value in changed.items())  # no restated defaults


def test_applying_the_gpu_profile_gives_a_valid_gpu_study(params: Path, tmp_path: Path):
    text, changes = apply(params, REPO / "params.gpu.yaml")
    assert ("model.backbone", "lenet5", "resnet18") in changes
    merged = tmp_path / "merged.yaml"
    merged.write_text(text)
    config, default = load(merged), load(params)
    assert (config.model.backbone, config.model.width) == ("resnet18", 64)
    assert config.pretrain.epochs > default.pretrain.epochs
    assert config.data == default.data  # what the profile does not name stays as it was
    # every encoder the profile pretrains is studied: as an init, or as a feature baseline
    assert set(config.finetune.inits) | set(config.finetune.baselines) == set(
        config.pretrain.methods
    )


def test_the_command_keeps_comments_and_a_second_application_changes_nothing(params: Path):
    before = params.read_text()
    dry = profile_cli(REPO / "params.gpu.yaml", params, "--dry-run").stdout
    assert "model.width: 32 -> 64" in dry and params.read_text() == before
    out = profile_cli(REPO / "params.gpu.yaml", params).stdout
    assert "model.width: 32 -> 64" in out
    after = params.read_text()
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert comments == [line for line in after.splitlines() if line.lstrip().startswith("#")]
    assert load(params).model.width == 64
    again = profile_cli(REPO / "params.gpu.yaml", params).stdout
    assert "already has every value" in again and params.read_text() == after


def test_an_unchanged_round_trip_is_byte_identical(params: Path, tmp_path: Path):
    text, changes = apply(params, overlay(tmp_path, "model:\n  width: 32\n"))
    assert changes == [] and text == params.read_text()


def test_a_list_is_replaced_and_the_comment_below_it_stays(params: Path, tmp_path: Path):
    text, _ = apply(params, overlay(tmp_path, "finetune:\n  seeds: [3, 4, 5]\n"))
    assert yaml.safe_load(text)["finetune"]["seeds"] == [3, 4, 5]
    below = params.read_text().split("    - 1\n", 1)[1].splitlines()[0]  # after the old seeds
    assert below.lstrip().startswith("#") and f"    - 5\n{below}\n" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  widht: 64\n", "model.widht is not a key of"),
        ("model: resnet18\n", "model must be a mapping"),
        ("finetune:\n  seeds:\n    a: 1\n", "finetune.seeds must be a single value or list"),
        ("- model\n", "a profile is a mapping"),
        ("finetune:\n  max_passes: 0\n", "finetune.max_passes"),
    ],
)
def test_a_bad_profile_is_one_line_naming_the_key_and_nothing_is_written(
    params: Path, tmp_path: Path, text: str, message: str
):
    before = params.read_text()
    with pytest.raises(ConfigError, match=message):
        apply(params, overlay(tmp_path, text))
    result = profile_cli(tmp_path / "profile.yaml", params, check=False)
    assert result.returncode == 2 and message.split()[0] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and params.read_text() == before
