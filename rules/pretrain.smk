# Self-supervised pretraining: one job per method in pretrain.methods.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule pretrain:
    input:
        CODE["pretrain"],
        prepared=f"data/prepared/{DATASET}",
        splits=f"data/splits/{DATASET}",
        policy=f"data/augment/{DATASET}/policy.json",
    output:
        model=directory("models/pretrain/{method}"),
        metrics="metrics/pretrain/{method}.json",
        curves="metrics/pretrain/{method}.csv",
    log:
        "logs/pretrain/{method}.log",
    conda:
        "../envs/pipeline.yaml"
    # One thread per job, jobs side by side (see rules/finetune.smk).
    threads: 1
    params:
        values=lambda wildcards: stage_params("pretrain", wildcards.method),
        dataset=DATASET,
    shell:
        "python -m pipeline pretrain --dataset {params.dataset} --method {wildcards.method}"
        " --log {log}"
