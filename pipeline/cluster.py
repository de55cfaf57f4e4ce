"""cluster: check that the SLURM cluster can run every job params.yaml asks for (``sinfo``).

Snakemake runs this before it submits anything when its executor is slurm (the Snakefile's
``onstart``), and ``python -m pipeline cluster`` runs it by hand. Without it, a request no node
can meet (more memory or GPUs than any node has) is refused by ``sbatch`` only when that job's
turn comes, after the jobs before it have run; or, where the scheduler queues such a job, it
waits for ever.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass
from typing import Any

STAGES = ("download", "split", "augment", "pretrain", "finetune", "evaluate", "visualize")


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own; ``--params`` is added by the CLI."""


def main(args: argparse.Namespace) -> int:
    from pipeline.config import load

    config = load(args.params)
    problem = problem_with(config.raw, nodes())
    if problem:
        print(f"error: {problem}")
        return 1
    print(f"{args.params}: every job fits this cluster's nodes")
    return 0


def nodes() -> list[Node]:
    """The cluster's nodes as ``sinfo`` reports them (name, CPUs, memory in MB, GPUs in GRES)."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise SystemExit(
            f"error: cannot ask SLURM for its nodes (sinfo: {err}); is this a "
            "SLURM login node with slurmctld reachable?"
        ) from None
    found: dict[str, Node] = {}
    for line in out.splitlines():
        name, cpus, mem, gres = line.strip().split("|")
        found[name] = Node(name, int(cpus), int(mem.rstrip("+")), _gpus(gres))
    return list(found.values())


def _gpus(gres: str) -> int:
    """GPUs in a GRES string such as ``gpu:4``, ``gpu:a100:2(S:0-1)`` or ``(null)``."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def problem_with(params: dict[str, Any], cluster: list[Node]) -> str | None:
    """The first stage whose job request no node of the cluster can meet, described; else None.
    (``trainer.num_nodes`` above one is refused before this, by training.device_problem.)"""
    if not cluster:
        return "sinfo lists no nodes: the cluster has none up"
    for stage in STAGES:
        wanted = params["resources"][stage]
        fits = [
            n
            for n in cluster
            if n.cpus >= wanted["cpus"]
            and n.mem_mb >= wanted["mem_mb"]
            and n.gpus >= wanted.get("gpus", 0)
        ]
        if not fits:
            return (
                f"no node of this cluster can run the {stage} stage's jobs: params.yaml asks for "
                f"{_describe(wanted)} (resources.{stage}), the largest node offers "
                f"{_largest(cluster)}; lower resources.{stage} in params.yaml"
            )
    return None


def _describe(wanted: dict[str, int]) -> str:
    gpus = f", {wanted['gpus']} GPU(s)" if wanted.get("gpus") else ""
    return f"{wanted['cpus']} CPU(s), {wanted['mem_mb']} MB{gpus}"


def _largest(cluster: list[Node]) -> str:
    return (
        f"{max(n.cpus for n in cluster)} CPU(s), {max(n.mem_mb for n in cluster)} MB, "
        f"{max(n.gpus for n in cluster)} GPU(s)"
    )
