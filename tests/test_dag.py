"""One declaration of the stages (pipeline/dag.py): both runners read it, dvc.yaml is generated.

The runner tests (tests/test_runners.py) check that Snakemake and DVC then run the same commands
on the same files and that the derived code dependencies are the modules each job imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline import dag
from pipeline.cli import PIPELINE_ORDER
from tests.conftest import REPO, run


def test_the_committed_dvc_yaml_is_what_the_declaration_generates():
    assert (REPO / "dvc.yaml").read_text() == dag.dvc_yaml(), (
        "dvc.yaml is stale: run `python -m pipeline.dag`"
    )
    assert "is current" in run(["python", "-m", "pipeline.dag", "--check"], REPO).stdout


def test_a_stale_dvc_yaml_is_one_error_line_naming_the_fix(tmp_path: Path):
    stale = tmp_path / "dvc.yaml"
    stale.write_text(dag.dvc_yaml().replace("--log logs/split/", "--log logs/splits/"))
    result = run(
        ["python", "-m", "pipeline.dag", "--check", "--file", str(stale)], REPO, check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("regenerate it with: python -m pipeline.dag")
    run(["python", "-m", "pipeline.dag", "--file", str(stale)], REPO)
    assert stale.read_text() == dag.dvc_yaml()


def _pipeline_imports(path: Path) -> set[str]:
    """The pipeline modules a file's import statements name (as files that exist)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("pipeline")}
    files = set()
    for name in names:
        base = Path(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if (REPO / candidate).is_file():
                files.add(str(candidate))
    return files


def test_code_dependencies_are_closed_under_imports_including_those_inside_functions():
    for stage in dag.STAGES:
        code = set(dag.code(stage.command))
        assert {f"pipeline/stages/{stage.command}.py", "pipeline/cli.py", dag.SCHEMA} <= code
        for file in code - {dag.SCHEMA}:
            assert _pipeline_imports(REPO / file) <= code, (stage.name, file)
    # visualize imports the study's answer inside functions only; it is still a dependency
    assert "pipeline/study.py" in dag.code("visualize")
    # no stage depends on another stage's module for a file name (pipeline/paths.py has them)
    assert "pipeline/stages/finetune.py" not in dag.code("evaluate")
    assert "pipeline/viz/report.py" not in dag.code("finetune")


def test_the_declared_stages_are_the_cli_stages_in_pipeline_order():
    commands = list(dict.fromkeys(stage.command for stage in dag.STAGES))
    assert tuple(commands) == PIPELINE_ORDER
    names = [stage.name for stage in dag.STAGES]
    assert len(names) == len(set(names))


def test_both_runners_get_the_same_command_from_one_template():
    pretrain = dag.stage("pretrain")
    assert dag.snakemake_shell("pretrain", "mnist") == (
        "python -m pipeline pretrain --dataset mnist --method {wildcards.method} --log {log}"
    )
    assert dag.dvc_stage(pretrain)["do"]["cmd"] == (
        "python -m pipeline pretrain --dataset ${data.dataset} --method ${item} "
        "--log logs/pretrain/${item}.log"
    )
    # per-dataset stages keep the dataset a wildcard, so `snakemake data/splits/mnist` works
    assert dag.snakemake_outputs("split", "fashion_mnist", str) == {
        "splits": "data/splits/{dataset}"
    }
    inputs = dag.snakemake_inputs("evaluate", "mnist", ["simclr"], ["a-knn-0.1", "b-knn-0.1"])
    assert inputs["models"] == ["models/finetune/a-knn-0.1", "models/finetune/b-knn-0.1"]
    assert inputs["prepared"] == "data/prepared/mnist"


def test_a_matrix_field_may_be_a_literal_list_rendered_as_a_yaml_list():
    # finetune_semi repeats over two params lists and one literal mode: DVC's matrix cannot
    # leave combinations out, so the semi cells are a stage of their own.
    semi = dag.dvc_stage(dag.stage("finetune_semi"))
    assert semi["matrix"] == {
        "init": "${finetune.semi.inits}",
        "mode": ["semi"],
        "fraction": "${finetune.semi.fractions}",
    }
    assert "    matrix:\n      init: ${finetune.semi.inits}\n      mode:\n      - semi\n" in (
        dag.dvc_yaml()
    )
    assert semi["cmd"] == dag.dvc_stage(dag.stage("finetune"))["cmd"]  # one command, three stages
    assert dag.snakemake_shell("finetune_semi", "mnist") == dag.snakemake_shell("finetune", "mnist")
