# Data stages: download (fetch, verify, decode) and split (train/val/test, label fractions).
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule download:
    input:
        code("download"),
        **inputs("download"),
    output:
        **outputs("download"),
    log:
        log_file("download"),
    conda:
        "../envs/pipeline.yaml"
    threads: threads_for("download")
    resources:
        **job_resources("download"),
    params:
        values=stage_params("download"),
    shell:
        command("download")


rule split:
    input:
        code("split"),
        **inputs("split"),
    output:
        **outputs("split"),
    log:
        log_file("split"),
    conda:
        "../envs/pipeline.yaml"
    threads: threads_for("split")
    resources:
        **job_resources("split"),
    params:
        values=stage_params("split"),
    shell:
        command("split")
