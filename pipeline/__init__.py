"""Reproducible study of self-supervised pretraining for label-scarce image classification."""

import time

__version__ = "0.1.0"

#: When this process started the package (before torch and friends were imported), so a stage's
#: MLflow run can record its whole wall-clock time, imports included (tracking.stage_run).
PROCESS_STARTED = time.perf_counter()
