"""execution: run a command (``dvc repro``) as one pipeline execution, a parent MLflow run.

``python -m pipeline execution dvc repro`` opens the parent run, runs the command with
``PIPELINE_EXECUTION`` and ``PIPELINE_PARENT_RUN`` in its environment, so that every stage run
it starts is nested under the parent, and ends the parent FINISHED or FAILED by the command's
exit code, which it returns. ``make repro`` uses it; Snakemake needs no wrapper, because the
Snakefile's ``onstart`` and ``onsuccess``/``onerror`` do the same.
"""

from __future__ import annotations

import argparse
import subprocess

from pipeline import tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runner", help="the command that runs the stages, e.g. dvc")
    parser.add_argument("runner_args", nargs=argparse.REMAINDER, help="its arguments")


def main(args: argparse.Namespace) -> int:
    from pipeline.config import load

    command = [args.runner, *args.runner_args]
    parent = tracking.start_execution(load(args.params), runner=" ".join(command))
    try:
        code = subprocess.call(command)
    except BaseException:
        tracking.end_execution("FAILED", parent)
        raise
    tracking.end_execution("FINISHED" if code == 0 else "FAILED", parent)
    return code
