"""The pipeline's DAG, declared once: per stage its command, data inputs, outputs and log.

Both runners read this. The Snakemake rules (rules/*.smk) take their inputs, outputs, log and
shell command from it; dvc.yaml is generated from it (``python -m pipeline.dag`` rewrites it,
and tests/test_dag.py fails when the committed file is stale). Two things are not written here
because they are derived: a stage's params are its module's ``PARAMS`` (or ``params_for``), and
its code dependencies are the pipeline modules its command can import, found by reading the
import statements (module level and inside functions) from ``pipeline/__main__.py`` and the
stage's module, plus the params schema that pipeline/config.py reads, plus every module of a
plug-in package (``PLUGINS``) whose loader is imported. A new module imported by a stage is then
a dependency with no edit anywhere.

Paths use placeholders: ``{dataset}`` (``data.dataset``), ``{method}`` (one job per pretraining
method) and ``{init}``, ``{mode}``, ``{fraction}`` (one job per cell of the study). A dependency
marked ``each`` stands for every job of a looped stage: Snakemake lists them one by one, DVC
(which cannot name a matrix's outputs in another stage) depends on their folder.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "schemas/params.schema.yaml"
DVC_FILE = "dvc.yaml"
#: Modules that import a package's modules by name (importlib), which no import statement shows:
#: importing one of them depends on every module of that package (plug-ins, such as methods).
PLUGINS = {"pipeline.methods._registry": "pipeline.methods"}

if TYPE_CHECKING:
    from typing import Literal, TypeAlias

    #: How DVC repeats a stage: ``foreach`` over one params list, or ``matrix`` over the
    #: product of several, each a (placeholder field, values) pair whose values are a params
    #: key (a string) or a literal tuple of values (one mode, say).
    _Loop: TypeAlias = (
        tuple[Literal["foreach"], str]
        | tuple[Literal["matrix"], tuple[tuple[str, str | tuple[str, ...]], ...]]
    )


@dataclass(frozen=True)
class Dep:
    """A data input. ``each``: "methods" or "cells", one path per job of that loop."""

    name: str
    path: str
    each: str | None = None


@dataclass(frozen=True)
class Out:
    """An output. ``dvc`` is the dvc.yaml section (outs, metrics, plots); ``plot`` holds DVC's
    plot options. Every output is cached (``cache=True``), metrics and plots too: outputs are
    not in git (.gitignore), so the cache and its remote are how a run is shared (README,
    "Sharing results"); ``cache=False`` would leave a file in neither."""

    name: str
    path: str
    directory: bool = False
    dvc: str = "outs"
    cache: bool = True
    plot: tuple[tuple[str, str], ...] = ()
    #: The category under which ``snakemake --report`` shows it; empty: not in the report.
    report: str = ""


@dataclass(frozen=True)
class Stage:
    """One stage: ``python -m pipeline <command> --dataset {dataset} <args> --log <log>``.

    ``loop`` is how DVC repeats it: ``("foreach", key)`` over a params list, or ``("matrix",
    ((field, key), ...))``, where a field may take a literal tuple of values instead of a params
    key; Snakemake repeats it through the wildcards in its paths.
    """

    name: str
    command: str
    deps: tuple[Dep, ...]
    outs: tuple[Out, ...]
    log: str
    args: str = ""
    loop: _Loop | None = None
    note: str = ""

    @property
    def dataset_wildcard(self) -> bool:
        """Stages whose outputs are per dataset keep ``{dataset}`` a Snakemake wildcard."""
        return all("{dataset}" in out.path for out in self.outs)


_PREPARED = Dep("prepared", "data/prepared/{dataset}")
_SPLITS = Dep("splits", "data/splits/{dataset}")
_POLICY = Dep("policy", "data/augment/{dataset}/policy.json")
_CELL = "{init}-{mode}-{fraction}"
_CELL_ARGS = "--init {init} --mode {mode} --fraction {fraction}"
_CELL_OUTS = (
    Out("model", f"models/finetune/{_CELL}", directory=True),
    # Its scalars (validation accuracy, per seed and mean; best epoch; budget) are DVC metrics:
    # `dvc exp show` lists them per cell beside the test accuracies of metrics/summary.json.
    Out("metrics", f"metrics/finetune/{_CELL}.json", dvc="metrics"),
    Out(
        "curve",
        f"metrics/finetune/{_CELL}.csv",
        dvc="plots",
        plot=(
            ("x", "epoch"),
            ("y", "val_acc"),
            ("title", f"{_CELL} fine-tuning, validation accuracy"),
        ),
    ),
)
_CELL_DEPS = (_PREPARED, _SPLITS, _POLICY, Dep("encoder", "models/pretrain/{init}"))


def _cell_stage(
    name: str,
    inits: str,
    modes: str | tuple[str, ...],
    fractions: str = "finetune.fractions",
    note: str = "",
) -> Stage:
    """One of the fine-tuning stages: the same command, data and outputs per cell, over the
    matrix of ``inits`` x ``modes`` x ``fractions`` (params keys, or a literal tuple)."""
    return Stage(
        name,
        "finetune",
        _CELL_DEPS,
        _CELL_OUTS,
        log=f"logs/finetune/{_CELL}.log",
        args=_CELL_ARGS,
        loop=("matrix", (("init", inits), ("mode", modes), ("fraction", fractions))),
        note=note,
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "download",
        (),
        (
            Out("raw", "data/raw/{dataset}", directory=True),
            Out("prepared", "data/prepared/{dataset}", directory=True),
        ),
        log="logs/download/{dataset}.log",
    ),
    Stage(
        "split",
        "split",
        (_PREPARED,),
        (Out("splits", "data/splits/{dataset}", directory=True),),
        log="logs/split/{dataset}.log",
    ),
    Stage(
        "augment",
        "augment",
        (_PREPARED, _SPLITS),
        (
            Out("policy", "data/augment/{dataset}/policy.json"),
            Out("preview", "data/augment/{dataset}/preview.png", report="Data"),
            Out("pool", "data/augment/{dataset}/pool", directory=True),
        ),
        log="logs/augment/{dataset}.log",
    ),
    Stage(
        "pretrain",
        "pretrain",
        (_PREPARED, _SPLITS, _POLICY),
        (
            Out("model", "models/pretrain/{method}", directory=True),
            Out("metrics", "metrics/pretrain/{method}.json", dvc="metrics"),
            Out(
                "curves",
                "metrics/pretrain/{method}.csv",
                dvc="plots",
                plot=(
                    ("x", "epoch"),
                    ("y", "val_knn_acc"),
                    ("title", "{method} pretraining, validation kNN accuracy"),
                ),
            ),
        ),
        log="logs/pretrain/{method}.log",
        args="--method {method}",
        loop=("foreach", "pretrain.methods"),
    ),
    _cell_stage("finetune", "finetune.inits", "finetune.modes"),
    _cell_stage(
        "finetune_baseline",
        "finetune.baselines",
        "finetune.baseline_modes",
        note="The feature baselines (raw pixels) in the frozen modes: DVC's matrix cannot "
        "leave pixels-finetune out of the stage above, so they are a stage of their "
        "own.",
    ),
    _cell_stage(
        "finetune_semi",
        "finetune.semi.inits",
        ("semi",),
        "finetune.semi.fractions",
        note="Mode semi (FixMatch) at the inits and label budgets of finetune.semi: a semi cell "
        "costs about ten fine-tuning cells on the CPU, so it runs only where asked, and DVC's "
        "matrix cannot leave the other combinations out. Empty lists make no stage.",
    ),
    Stage(
        "evaluate",
        "evaluate",
        (
            _PREPARED,
            _SPLITS,
            Dep("models", "models/finetune/{cell}", each="cells"),
            Dep("metrics", "metrics/finetune/{cell}.json", each="cells"),
        ),
        (
            Out("cells", "metrics/eval", directory=True),
            Out("table", "metrics/summary.csv", report="Results"),
            Out("markdown", "metrics/summary.md"),
            Out("summary", "metrics/summary.json", dvc="metrics"),
            Out(
                "curve",
                "metrics/label_efficiency.csv",
                dvc="plots",
                plot=(
                    ("x", "fraction"),
                    ("y", "accuracy"),
                    ("title", "Test accuracy by label budget (all inits and modes)"),
                ),
                report="Results",
            ),
            Out("figure", "reports/figures/label_efficiency.png", dvc="plots", report="Results"),
        ),
        log="logs/evaluate/{dataset}.log",
    ),
    Stage(
        "visualize",
        "visualize",
        (
            _PREPARED,
            _SPLITS,
            _POLICY,
            Dep("preview", "data/augment/{dataset}/preview.png"),
            Dep("encoders", "models/pretrain/{method}", each="methods"),
            Dep("pretrain_metrics", "metrics/pretrain/{method}.json", each="methods"),
            Dep("pretrain_curves", "metrics/pretrain/{method}.csv", each="methods"),
            Dep("models", "models/finetune/{cell}", each="cells"),
            Dep("finetune_metrics", "metrics/finetune/{cell}.json", each="cells"),
            Dep("finetune_curves", "metrics/finetune/{cell}.csv", each="cells"),
            Dep("cells", "metrics/eval"),
            Dep("summary", "metrics/summary.json"),
            Dep("figure", "reports/figures/label_efficiency.png"),
        ),
        (
            Out("report", "reports/index.html", report="Report"),
            Out("figures", "reports/figures/visualize", directory=True),
        ),
        log="logs/visualize/{dataset}.log",
    ),
)


def stage(name: str) -> Stage:
    """The declaration of one stage (a Snakemake rule, a DVC stage)."""
    for declared in STAGES:
        if declared.name == name:
            return declared
    raise KeyError(
        f"no stage {name!r} in pipeline/dag.py; declared: {', '.join(s.name for s in STAGES)}"
    )


def command_line(declared: Stage) -> str:
    """The stage's command with placeholders, the same for both runners."""
    args = f" {declared.args}" if declared.args else ""
    return f"python -m pipeline {declared.command} --dataset {{dataset}}{args} --log {{log}}"


# ---------------------------------------------------------------------------- code dependencies


@functools.cache
def code(command: str) -> tuple[str, ...]:
    """The files ``python -m pipeline <command>`` can import from pipeline/, and the schema."""
    roots = ["pipeline.__main__", f"pipeline.stages.{command}"]
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if path is None or module in seen:
            continue
        seen[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages above it
        todo += _imports(path, module)
        if module in PLUGINS:
            package = ROOT.joinpath(*PLUGINS[module].split("."))
            todo += [
                f"{PLUGINS[module]}.{p.stem}"
                for p in sorted(package.glob("*.py"))
                if p.stem != "__init__"
            ]
    files = sorted(str(path.relative_to(ROOT)) for path in seen.values())
    return (*files, SCHEMA)


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None  # a name imported from a module (a function, a class), not a module itself


@functools.cache  # each file is read once per process, however many stages import it
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """Every ``pipeline`` module an import statement in ``path`` names, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return tuple(name for name in found if name.split(".")[0] == "pipeline")


# ------------------------------------------------------------------------------------ Snakemake


def _for_snakemake(declared: Stage, path: str, dataset: str) -> str:
    return path if declared.dataset_wildcard else path.replace("{dataset}", dataset)


def snakemake_inputs(
    name: str, dataset: str, methods: Iterable[str], cells: Iterable[str]
) -> dict[str, str | list[str]]:
    """A rule's named inputs; its code is ``code(command)``, listed first by the rule."""
    declared = stage(name)
    loops = {"methods": ("method", list(methods)), "cells": ("cell", list(cells))}
    inputs: dict[str, str | list[str]] = {}
    for dep in declared.deps:
        path = _for_snakemake(declared, dep.path, dataset)
        if dep.each is None:
            inputs[dep.name] = path
        else:
            field, values = loops[dep.each]
            inputs[dep.name] = [path.replace(f"{{{field}}}", value) for value in values]
    return inputs


def snakemake_outputs(
    name: str,
    dataset: str,
    directory: Callable[[str], str],
    report: Callable[..., str] | None = None,
) -> dict[str, str]:
    """A rule's named outputs; folders wrapped in Snakemake's ``directory``, and the outputs a
    reader of ``snakemake --report`` wants (the study's page, figure and tables) in ``report``."""
    declared = stage(name)
    named = {}
    for out in declared.outs:
        path = _for_snakemake(declared, out.path, dataset)
        if out.directory:
            path = directory(path)
        elif out.report and report is not None:
            path = report(path, category=out.report)
        named[out.name] = path
    return named


def snakemake_log(name: str, dataset: str) -> str:
    declared = stage(name)
    return _for_snakemake(declared, declared.log, dataset)


def snakemake_shell(name: str, dataset: str) -> str:
    """The shell command: loop placeholders become ``{wildcards.*}``, the log ``{log}``."""
    declared = stage(name)
    text = command_line(declared)
    if not declared.dataset_wildcard:
        text = text.replace("{dataset}", dataset)
    for field in ("dataset", "method", "init", "mode", "fraction"):
        text = text.replace(f"{{{field}}}", f"{{wildcards.{field}}}")
    return text


# ------------------------------------------------------------------------------------------ DVC


def _for_dvc(declared: Stage, text: str) -> str:
    """Placeholders as DVC's ``${...}`` interpolation: params keys and the loop's ``item``."""
    text = text.replace("{dataset}", "${data.dataset}")
    if declared.loop and declared.loop[0] == "foreach":
        text = text.replace("{method}", "${item}")
    if declared.loop and declared.loop[0] == "matrix":
        for field, _ in declared.loop[1]:
            text = text.replace(f"{{{field}}}", f"${{item.{field}}}")
    return text


def dvc_params(declared: Stage) -> list[str]:
    """The params keys the stage's module declares (pretraining: per method, ``params_for``)."""
    import importlib

    module = importlib.import_module(f"pipeline.stages.{declared.command}")  # no torch at import
    if declared.loop and declared.loop[0] == "foreach":
        return [_for_dvc(declared, key) for key in module.params_for("{method}")]
    return list(module.PARAMS)


def dvc_stage(declared: Stage) -> dict[str, object]:
    """One stage of dvc.yaml."""
    entry: dict[str, object] = {}
    if declared.loop and declared.loop[0] == "foreach":
        entry["foreach"] = f"${{{declared.loop[1]}}}"
    if declared.loop and declared.loop[0] == "matrix":
        entry["matrix"] = {
            field: f"${{{values}}}" if isinstance(values, str) else list(values)
            for field, values in declared.loop[1]
        }
    log = declared.log
    entry["cmd"] = _for_dvc(declared, command_line(declared).replace("{log}", log))
    deps = list(code(declared.command))
    for dep in declared.deps:
        path = dep.path.rpartition("/")[0] if dep.each else dep.path
        if path not in deps:
            deps.append(path)
    entry["deps"] = [_for_dvc(declared, d) for d in deps]
    entry["params"] = dvc_params(declared)
    for section in ("outs", "metrics", "plots"):
        outs = [_dvc_out(declared, out) for out in declared.outs if out.dvc == section]
        if outs:
            entry[section] = outs
    if declared.loop and declared.loop[0] == "foreach":
        return {"foreach": entry.pop("foreach"), "do": entry}
    return entry


def _dvc_out(declared: Stage, out: Out) -> str | dict[str, dict[str, str | bool]]:
    path = _for_dvc(declared, out.path)
    options: dict[str, str | bool] = {} if out.cache else {"cache": False}
    options |= {key: _for_dvc(declared, value) for key, value in out.plot}
    return {path: options} if options else path


def dvc_yaml() -> str:
    """The text of dvc.yaml, as generated from STAGES."""
    import yaml

    header = (
        "# Generated from pipeline/dag.py by `python -m pipeline.dag`: do not edit by hand.\n"
        "# The same stages, commands, deps, outs and params as the Snakemake rules (both read\n"
        "# pipeline/dag.py); tests/test_dag.py fails when this file is stale.\n"
    )
    blocks = []
    for declared in STAGES:
        text = yaml.safe_dump(
            {declared.name: dvc_stage(declared)},
            sort_keys=False,
            width=4096,
            default_flow_style=False,
        )
        note = "".join(f"  # {line}\n" for line in _wrap(declared.note)) if declared.note else ""
        blocks.append(note + "".join(f"  {line}\n" for line in text.splitlines()))
    return header + "stages:\n" + "\n".join(blocks)


def _wrap(text: str, width: int = 94) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dag", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if the file differs from what pipeline/dag.py generates",
    )
    parser.add_argument(
        "--file",
        type=Path,
        default=ROOT / DVC_FILE,
        help="the dvc.yaml to write or check (default: the repository's)",
    )
    args = parser.parse_args(argv)
    target = args.file
    text = dvc_yaml()
    current = target.read_text(encoding="utf-8") if target.is_file() else ""
    if args.check:
        if current != text:
            print(
                f"error: {target} is stale (pipeline/dag.py declares other stages); "
                "regenerate it with: python -m pipeline.dag",
                file=sys.stderr,
            )
            return 1
        print(f"{target} is current")
        return 0
    if current != text:
        target.write_text(text, encoding="utf-8")
    print(f"wrote {target}" if current != text else f"{target} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
