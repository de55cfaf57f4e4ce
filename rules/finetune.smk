# The study's matrix: one fine-tuning job per init x mode x label fraction (seeds inside a job).
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule finetune:
    input:
        CODE["finetune"],
        prepared=f"data/prepared/{DATASET}",
        splits=f"data/splits/{DATASET}",
        policy=f"data/augment/{DATASET}/policy.json",
        encoder="models/pretrain/{init}",
    output:
        model=directory("models/finetune/{init}-{mode}-{fraction}"),
        metrics="metrics/finetune/{init}-{mode}-{fraction}.json",
        curve="metrics/finetune/{init}-{mode}-{fraction}.csv",
    log:
        "logs/finetune/{init}-{mode}-{fraction}.log",
    conda:
        "../envs/pipeline.yaml"
    # Training uses every core: jobs side by side would only oversubscribe them.
    threads: workflow.cores
    params:
        values=stage_params("finetune"),
        dataset=DATASET,
    shell:
        "python -m pipeline finetune --dataset {params.dataset} --init {wildcards.init}"
        " --mode {wildcards.mode} --fraction {wildcards.fraction} --log {log}"
