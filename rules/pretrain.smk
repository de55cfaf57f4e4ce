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
    threads: threads_for("pretrain")
    resources:
        **job_resources("pretrain"),
    params:
        values=lambda wildcards: stage_params("pretrain", wildcards.method),
    shell:
        command("pretrain")
