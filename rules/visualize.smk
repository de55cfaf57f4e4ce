# The report: one self-contained HTML page of the whole study, and its figures.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule visualize:
    input:
        CODE["visualize"],
        prepared=f"data/prepared/{DATASET}",
        splits=f"data/splits/{DATASET}",
        policy=f"data/augment/{DATASET}/policy.json",
        preview=f"data/augment/{DATASET}/preview.png",
        encoders=expand(
            "models/pretrain/{method}", method=config["pretrain"]["methods"]
        ),
        pretrain=expand(
            "metrics/pretrain/{method}.{ext}",
            method=config["pretrain"]["methods"],
            ext=["json", "csv"],
        ),
        models=expand("models/finetune/{cell}", cell=finetune_cells()),
        finetune=expand(
            "metrics/finetune/{cell}.{ext}", cell=finetune_cells(), ext=["json", "csv"]
        ),
        cells="metrics/eval",
        summary="metrics/summary.json",
        figure="reports/figures/label_efficiency.png",
    output:
        report="reports/index.html",
        figures=directory("reports/figures/visualize"),
    log:
        f"logs/visualize/{DATASET}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: workflow.cores
    params:
        values=stage_params("visualize"),
        dataset=DATASET,
    shell:
        "python -m pipeline visualize --dataset {params.dataset} --log {log}"
