"""The study's answer, read from the fine-tuning metrics and the summary: which cell validation
chose per label fraction, and what the best self-supervised cell gains over the best baseline.

Shared by the evaluate stage (which logs the choice), the report and the benchmarks, so the
choice is made in one place; no stage imports another stage for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import SEMI_SUPERVISED_MODES, Config
from pipeline.errors import MissingInputError
from pipeline.io import read_json
from pipeline.paths import metrics_path

#: The inits a self-supervised encoder has to beat to be worth its cost (docs/science.md §8.6):
#: the same network from scratch, raw pixels and PCA.
BASELINES = ("scratch", "pixels", "pca")
SUMMARY = Path("metrics/summary")
CURVE = Path("metrics/label_efficiency.csv")
FIGURE = Path("reports/figures/label_efficiency.png")
#: The params.yaml keys that decide the study's cells and seeds (``config.finetune.cells()``):
#: every stage that reads all cells (evaluate, visualize) declares them.
CELL_PARAMS = (
    "finetune.inits",
    "finetune.baselines",
    "finetune.baseline_modes",
    "finetune.modes",
    "finetune.fractions",
    "finetune.semi.inits",
    "finetune.semi.fractions",
    "finetune.seeds",
)


def best_by_validation(
    config: Config, keep: Callable[[str, str], bool] | None = None
) -> dict[str, tuple[float, str, str, float]]:
    """Per label fraction (as named in files), ``(validation accuracy, init, mode, fraction)``
    of the cell with the best mean validation accuracy among the cells ``keep(init, mode)``
    accepts (all by default); ties keep the first cell of the matrix. The one place this choice
    is made: evaluation logs it, the report and the benchmarks show it."""
    best: dict[str, tuple[float, str, str, float]] = {}
    for init, mode, fraction in config.finetune.cells():
        if keep is not None and not keep(init, mode):
            continue
        validation = validation_accuracy(metrics_path(init, mode, fraction))
        key = paths.fraction_name(fraction)
        if key not in best or validation > best[key][0]:
            best[key] = (validation, init, mode, fraction)
    return best


def is_baseline(init: str, mode: str) -> bool:
    """Whether a cell learns from its labels alone: a baseline init (BASELINES) in a supervised
    mode. A semi-supervised cell learns from unlabeled images too, whatever its init, so it is
    on the self-supervised side of the answer."""
    return init in BASELINES and mode not in SEMI_SUPERVISED_MODES


def answer(config: Config, summary: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """The study's answer, per label fraction: the best self-supervised (or semi-supervised)
    cell against the best baseline cell (scratch, pixels or PCA, not semi), each chosen on
    validation, each scored by its mean test accuracy from ``summary`` (metrics/summary.json's
    ``test_accuracy``). The evaluate stage adds the paired interval of the difference."""
    ssl = best_by_validation(config, lambda init, mode: not is_baseline(init, mode))
    base = best_by_validation(config, is_baseline)
    rows = []
    for fraction in (paths.fraction_name(f) for f in config.finetune.fractions):
        if fraction not in ssl or fraction not in base:
            continue
        row: dict[str, Any] = {"fraction": fraction}
        for side, chosen in (("ssl", ssl[fraction]), ("baseline", base[fraction])):
            _, init, mode, _ = chosen
            scores = summary[f"{init}-{mode}"][paths.metric_key(fraction)]
            row[side] = {"cell": f"{init}-{mode}", "test": scores["mean"]}
        row["gain"] = row["ssl"]["test"] - row["baseline"]["test"]
        rows.append(row)
    return rows


def validation_accuracy(path: Path) -> float:
    try:
        return float(read_json(path)["val_acc_mean"])
    except (OSError, ValueError, KeyError) as err:
        raise MissingInputError(
            f"{path} is missing or unreadable ({err}); run the finetune stage for that cell"
        ) from None
