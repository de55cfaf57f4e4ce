"""One module per stage.

Each has ``run(config, dataset=None)``, which the CLI calls, and ``PARAMS``, the params.yaml keys
that change its outputs (Snakemake and DVC declare the same keys).

The CLI finds stages by listing this package, so adding a stage touches no shared module and
re-runs nothing else.
"""
