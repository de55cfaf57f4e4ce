# Snakemake entry point: load params.yaml, validate it, include the rules.
# Every rule runs `python -m pipeline <stage> ...` as pipeline/dag.py declares it, the same
# command as in dvc.yaml (generated from the same declaration).


configfile: "params.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/augment.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/visualize.smk"


rule all:
    default_target: True
    input:
        all_targets(),


# A run prints one console line per job start, "Job 7: pretrain, log logs/pretrain/simclr.log",
# where Snakemake would print a block listing every input (about 40 code files per job); the
# job's log has its detail, and a failed job is still shown in full. A dry run (snakemake -n)
# keeps the blocks: what would run, from which files, and why.
if not getattr(workflow.output_settings, "dryrun", True):
    for job_rule in workflow.rules:
        job_rule.message = "{rule}, log {log}" if job_rule.log else "{rule}"
