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
