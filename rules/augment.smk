# Augmentation: resolved policies (read by pretraining and fine-tuning), preview, offline pool.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule augment:
    input:
        CODE["augment"],
        prepared="data/prepared/{dataset}",
        splits="data/splits/{dataset}",
    output:
        policy="data/augment/{dataset}/policy.json",
        preview="data/augment/{dataset}/preview.png",
        pool=directory("data/augment/{dataset}/pool"),
    log:
        "logs/augment/{dataset}.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        values=stage_params("augment"),
    shell:
        "python -m pipeline augment --dataset {wildcards.dataset} --log {log}"
