# Evaluation: every classifier on the test split (the only rule that reads it), the summary.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule evaluate:
    input:
        code("evaluate"),
        **inputs("evaluate"),
    output:
        **outputs("evaluate"),
    log:
        log_file("evaluate"),
    conda:
        "../envs/pipeline.yaml"
    threads: threads_for("evaluate")
    resources:
        **job_resources("evaluate"),
    params:
        values=stage_params("evaluate"),
    shell:
        command("evaluate")
