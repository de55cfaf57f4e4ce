# The report: one self-contained HTML page of the whole study, and its figures.
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.


rule visualize:
    input:
        code("visualize"),
        **inputs("visualize"),
    output:
        **outputs("visualize"),
    log:
        log_file("visualize"),
    conda:
        "../envs/pipeline.yaml"
    threads: threads_for("visualize")
    resources:
        **job_resources("visualize"),
    params:
        values=stage_params("visualize"),
    shell:
        command("visualize")
