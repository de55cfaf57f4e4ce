# The study's matrix: one fine-tuning job per init x mode x label fraction (seeds inside a job).
# `conda:` documents each rule's software for --use-conda; `make setup` installs the same pins.
# Three rules with one command: DVC's matrix cannot leave out a combination, so the feature
# baselines (finetune.baselines: raw pixels, in the frozen modes only) and the semi cells
# (mode semi at finetune.semi.inits x finetune.semi.fractions) are stages of their own in
# dvc.yaml, and here the same rule again (`use rule`) under those names, each with its own
# wildcards, so that every job matches exactly one rule.


rule finetune:
    input:
        code("finetune"),
        **inputs("finetune"),
    output:
        **outputs("finetune"),
    log:
        log_file("finetune"),
    wildcard_constraints:
        init=TRAINED_INITS,
        mode="|".join(LABEL_ONLY_MODES),
    conda:
        "../envs/pipeline.yaml"
    # Threads and scheduler requests from params.yaml resources (one thread per training job
    # by default: on 2 cores two 1-thread jobs did 15-25 % more work than one 2-thread job,
    # BENCHMARKS.md, "CPU speed"). Snakemake exports OMP_NUM_THREADS=threads; torch follows it.
    threads: threads_for("finetune")
    resources:
        **job_resources("finetune"),
    params:
        values=stage_params("finetune"),
    shell:
        command("finetune")


use rule finetune as finetune_baseline with:
    wildcard_constraints:
        init=BASELINE_INITS,
        mode="linear|knn",


use rule finetune as finetune_semi with:
    wildcard_constraints:
        init=TRAINED_INITS,
        mode="|".join(SEMI_SUPERVISED_MODES),
