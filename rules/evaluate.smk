# Evaluation: every classifier on the test split (the only rule that reads it), the summary.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule evaluate:
    input:
        CODE["evaluate"],
        prepared=f"data/prepared/{DATASET}",
        splits=f"data/splits/{DATASET}",
        models=expand("models/finetune/{cell}", cell=finetune_cells()),
        metrics=expand("metrics/finetune/{cell}.json", cell=finetune_cells()),
    output:
        cells=directory("metrics/eval"),
        summary="metrics/summary.json",
        table="metrics/summary.csv",
        markdown="metrics/summary.md",
        curve="metrics/label_efficiency.csv",
        figure="reports/figures/label_efficiency.png",
    log:
        f"logs/evaluate/{DATASET}.log",
    conda:
        "../envs/pipeline.yaml"
    # The last jobs run alone: every core.
    threads: workflow.cores
    params:
        values=stage_params("evaluate"),
        dataset=DATASET,
    shell:
        "python -m pipeline evaluate --dataset {params.dataset} --log {log}"
