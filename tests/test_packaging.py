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


#: Driven as commands, never imported: the two runners.
RUNNERS = {"snakemake", "dvc"}


def _providers_of_imports() -> dict[str, set[str]]:
    """Each top-level module pipeline/ imports, with the installed distributions that provide it
    (several for some: mlflow comes in mlflow, mlflow-skinny and mlflow-tracing)."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    modules = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"pipeline"}
    found = packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in found[m]} for m in modules}


def test_the_runtime_dependencies_are_what_the_pipeline_imports_and_its_runners():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {name.lower() for name in _pins(project["dependencies"])}
    providers = _providers_of_imports()
    undeclared = sorted(m for m, dists in providers.items() if not dists & declared)
    assert not undeclared, f"imported but not a direct dependency: {undeclared}"
    unused = declared - RUNNERS - set().union(*providers.values())
    assert not unused, f"direct dependencies pipeline/ never imports: {sorted(unused)}"


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
