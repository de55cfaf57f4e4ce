# Data stages: download (fetch, verify, decode) and split (train/val/test, label fractions).
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule download:
    input:
        CODE["download"],
    output:
        raw=directory("data/raw/{dataset}"),
        prepared=directory("data/prepared/{dataset}"),
    log:
        "logs/download/{dataset}.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        values=stage_params("download"),
    shell:
        "python -m pipeline download --dataset {wildcards.dataset} --log {log}"


rule split:
    input:
        CODE["split"],
        prepared="data/prepared/{dataset}",
    output:
        directory("data/splits/{dataset}"),
    log:
        "logs/split/{dataset}.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        values=stage_params("split"),
    shell:
        "python -m pipeline split --dataset {wildcards.dataset} --log {log}"
