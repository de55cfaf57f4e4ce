# Augmentation: resolved policies (read by pretraining and fine-tuning), preview, offline pool.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule augment:
    input:
        code("augment"),
        **inputs("augment"),
    output:
        **outputs("augment"),
    log:
        log_file("augment"),
    conda:
        "../envs/pipeline.yaml"
    threads: threads_for("augment")
    resources:
        **job_resources("augment"),
    params:
        values=stage_params("augment"),
    shell:
        command("augment")
