# Self-supervised pretraining: one job per method in pretrain.methods.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule pretrain:
    input:
        code("pretrain"),
        **inputs("pretrain"),
    output:
        **outputs("pretrain"),
    log:
        log_file("pretrain"),
    conda:
        "../envs/pipeline.yaml"
    # One thread per job, jobs side by side (see rules/finetune.smk).
    threads: 1
    params:
        values=lambda wildcards: stage_params("pretrain", wildcards.method),
    shell:
        command("pretrain")
