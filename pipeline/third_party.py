"""Warnings of the libraries we build on that every job printed and that ask nothing of a user.

Each is matched by its message and the module that warns, so anything else still shows; each
names the upstream issue, so the filter can go when the library changes. Called where Lightning
is about to train (the training stages' Trainer and the report's toy networks).
"""

from __future__ import annotations

import warnings


def ignore_known_warnings() -> None:
    """Hide third-party warnings that every training job printed and that ask nothing of the
    user, each matched by its message and the module that warns (anything else still shows).

    - torch deprecates ``LeafSpec()``, which Lightning 2.6 still builds for every batch
      (Lightning-AI/pytorch-lightning#21326); nothing to do on our side.
    - Lightning suggests ``srun`` on any machine where SLURM is installed and a job was not
      started by it (added in Lightning-AI/pytorch-lightning#15011; lightly-ai/lightly-train#148
      filters it for the same reason). The pipeline's jobs are started by Snakemake or DVC, and
      ``make cluster`` places them on the cluster itself.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The `srun` command is available on your system but is not used",
        module=r"lightning\.fabric\.plugins\.environments\.slurm",
    )


def expect_frozen_modules() -> None:
    """Hide Lightning's "Found N module(s) in eval mode at the start of training" for a run that
    freezes its encoder on purpose: the linear probe keeps the pretrained encoder in eval mode so
    that its batch-norm statistics stay the pretrained ones (docs/science.md §8.1). Lightning
    2.6 warns about any module in eval mode (Lightning-AI/pytorch-lightning#21146, which says
    that some runs want it); called only for such runs, so an encoder left in eval mode by
    mistake elsewhere still warns.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"Found \d+ module\(s\) in eval mode at the start of training",
    )
