"""Two clean runs with the same seeds on the CPU give the same bytes; another seed does not.

Each run is a fresh `git clone` of the tiny project (nothing cached, its own MLflow store) run by
Snakemake up to the evaluation, as a user would; the runs go side by side, one core each, so no
state can pass from one to the next. Byte equality covers the split files, every
metrics file (validation and test accuracies, curves, intervals) and every model file.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

from tests.conftest import run, run_env

#: Everything evaluation needs; the report (visualize) is checked for repeatability elsewhere.
TARGET = "metrics/summary.json"
COMPARED = ("data/splits", "metrics", "models")


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under the compared output folders, by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in COMPARED for path in sorted((root / folder).rglob("*")) if path.is_file()
    }  # fmt: skip


def clone(project: Path, name: str, **changes: dict) -> Path:
    """A fresh clone of ``project``, its params optionally changed."""
    clone = project.parent / name
    run(["git", "clone", "-q", str(project), str(clone)], project.parent)
    if changes:
        params = yaml.safe_load((clone / "params.yaml").read_text())
        for section, values in changes.items():
            params[section].update(values)
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return clone


def run_all(*jobs: tuple[Path, str]) -> None:
    """Run Snakemake in each clone to its target, all at once (one core each)."""
    processes = [
        (folder, subprocess.Popen(["snakemake", "--cores", "1", target], cwd=folder,
                                  env=run_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
        for folder, target in jobs
    ]  # fmt: skip
    for folder, process in processes:
        output = process.communicate(timeout=900)[0]
        assert process.returncode == 0, f"{folder}:\n{output[-4000:]}"


def test_same_seeds_same_bytes_other_split_seed_other_splits(project: Path):
    seed = yaml.safe_load((project / "params.yaml").read_text())["split"]["seed"]
    first, second = clone(project, "first"), clone(project, "second")
    other = clone(project, "other", split={"seed": seed + 1})
    run_all((first, TARGET), (second, TARGET), (other, "data/splits/idx"))
    first, second, other = fingerprint(first), fingerprint(second), fingerprint(other)

    assert any(p.startswith("data/splits/") and p.endswith(".npy") for p in first)
    assert any(p.startswith("metrics/eval/") for p in first)
    assert any(p.startswith("models/finetune/") and p.endswith(".pt") for p in first)
    differing = sorted(p for p in first.keys() | second.keys() if first.get(p) != second.get(p))
    assert differing == []

    for name in ("train.npy", "val.npy", "labeled-1.0.npy"):
        assert other[f"data/splits/idx/{name}"] != first[f"data/splits/idx/{name}"], name
    # The official test set does not depend on the seed (only on duplicates of training images).
    assert other["data/splits/idx/test.npy"] == first["data/splits/idx/test.npy"]
