"""The ways of installing the pipeline agree with each other and with README.md."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO


def _pins(lines: list[str]) -> dict[str, str]:
    return dict(line.split("==", 1) for line in lines)


def test_the_conda_env_pins_the_same_direct_dependencies_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "envs/pipeline.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip) == _pins(project["dependencies"])


def test_the_lock_file_agrees_with_every_direct_pin():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            lock[name.lower().replace("_", "-")] = version
    pins = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():  # dev, cluster, s3
        pins += [p for p in extra if not p.startswith("pipeline[")]  # dev includes the others
    for name, version in _pins(pins).items():
        assert lock[name.split("[")[0].lower()] == version, name


def test_ci_runs_the_test_command_that_readme_shows():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, re.M)
    assert commands[:2] == ["make run", "make test"]
    ci = (REPO / ".ci/run").read_text()
    assert re.search(r"^make test$", ci, re.M)
