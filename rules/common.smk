# Shared helpers: params validation, the params each stage reads, the code each stage runs.
from pipeline import dag, methods
from pipeline.config import (
    LABEL_ONLY_MODES,
    MODES,
    SEMI_SUPERVISED_MODES,
    ConfigError,
    from_dict,
)
from pipeline.data import datasets
import os
import sys

# The schema and the checks across sections (the matrix, semi cells): each mistake is one line.
try:
    config.update(from_dict(config, source="params.yaml").raw)
except ConfigError as err:
    sys.exit(f"error: {err}")


DATASET = config["data"]["dataset"]
# Inits that train (every mode) and feature baselines (frozen modes only): two finetune rules.
TRAINED_INITS = "|".join(m for m in methods.NAMES if m not in methods.FEATURE_BASELINES)
BASELINE_INITS = "|".join(methods.FEATURE_BASELINES)


# The names come from their registries (pipeline.data.datasets, pipeline.methods).
wildcard_constraints:
    dataset="|".join(datasets.NAMES),
    method="|".join(methods.NAMES),
    mode="|".join(MODES),
    fraction="[0-9]+\\.[0-9]+|[1-9][0-9]*pc|all",


# Every rule's inputs, outputs, log and command come from the one declaration of the stages,
# pipeline/dag.py, which dvc.yaml is generated from; a rule's code inputs are the pipeline
# modules its command imports, derived from the import statements.
def code(rule_name):
    return dag.code(dag.stage(rule_name).command)


def inputs(rule_name):
    methods = config["pretrain"]["methods"]
    return dag.snakemake_inputs(rule_name, DATASET, methods, finetune_cells())


def outputs(rule_name):
    return dag.snakemake_outputs(rule_name, DATASET, directory, report)


def log_file(rule_name):
    return dag.snakemake_log(rule_name, DATASET)


def command(rule_name):
    return dag.snakemake_shell(rule_name, DATASET)


def threads_for(stage):
    """A job's threads: params.yaml resources.<stage>.cpus (locally and on a cluster)."""
    return config["resources"][stage]["cpus"]


def job_resources(stage):
    """What a job asks a scheduler for, from params.yaml resources.<stage>: memory (MB), a
    wall-clock limit (minutes) and, for training jobs that want them, GPUs."""
    wanted = config["resources"][stage]
    resources = {"mem_mb": wanted["mem_mb"], "runtime": wanted["runtime"]}
    if wanted.get("gpus"):
        resources["gpu"] = wanted["gpus"]
    return resources


def stage_params(stage, method=None):
    """The values of the params.yaml keys a stage declares (its PARAMS): a change re-runs it."""
    import importlib

    stage_module = importlib.import_module(f"pipeline.stages.{stage}")
    keys = stage_module.params_for(method) if method else stage_module.PARAMS
    values = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return values


def all_targets():
    """What `snakemake` builds by default: every stage's outputs for the configured dataset."""
    return [
        f"data/splits/{DATASET}",
        f"data/augment/{DATASET}/policy.json",
        f"data/augment/{DATASET}/preview.png",
        *expand("models/pretrain/{method}", method=config["pretrain"]["methods"]),
        "metrics/summary.json",
        "reports/index.html",
    ]


def finetune_cells():
    """models/finetune/<init>-<mode>-<fraction> for every cell of the study's matrix."""
    from pipeline.config import from_dict
    from pipeline.paths import fraction_name

    cells = from_dict(config).finetune.cells()
    return [f"{init}-{mode}-{fraction_name(f)}" for init, mode, f in cells]


# Before any job starts: a request the machines cannot meet is one line (on a SLURM cluster, a
# job no node can hold, pipeline/cluster.py; anywhere, more GPUs or nodes than a job can have).
# Then the execution's parent MLflow run opens; the jobs inherit its id and nest their runs
# under it, and it ends with the workflow.
onstart:
    from pipeline import tracking
    from pipeline.config import from_dict
    from pipeline.training import device_problem

    settings = from_dict(config)
    problem = device_problem(settings.trainer)
    plugin = workflow.executor_plugin
    if problem is None and plugin is not None and plugin.name == "slurm":
        from pipeline.cluster import nodes, problem_with

        problem = problem_with(config, nodes())
    if problem:
        sys.exit(f"error: {problem}")
    # A store that cannot be written (full disk, read-only file, refusing server): one line.
    try:
        parent = tracking.start_execution(settings, runner="snakemake")
    except tracking.StoreError as err:
        sys.exit(f"error: {err}")
    execution = os.environ[tracking.EXECUTION_ENV]
    print(f"MLflow: execution {execution}, parent run {parent}", file=sys.stderr)


onsuccess:
    from pipeline import tracking

    tracking.end_execution("FINISHED")


onerror:
    from pipeline import tracking

    tracking.end_execution("FAILED")
