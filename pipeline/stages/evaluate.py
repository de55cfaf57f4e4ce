"""evaluate stage: every classifier of the study on the test split, the only stage that reads it.

Outputs: ``metrics/eval/<init>-<mode>-<fraction>.json`` (per seed: every metric of
``pipeline.evaluation.METRICS`` (accuracy, error, macro-F1, NLL, ECE) with bootstrap 95 %
intervals, per-class accuracy, confusion matrix), ``metrics/summary.{json,csv,md}`` (per metric:
rows init x mode, columns label fractions, mean ± std over seeds with the mean interval),
``metrics/label_efficiency.csv`` (every metric per cell) and
``reports/figures/label_efficiency.png`` (the study's figure, test accuracy). The best classifier
of each label fraction, chosen by *validation* accuracy, is logged to MLflow as a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Config
from pipeline.io import write_json, write_text
from pipeline.paths import model_dir
from pipeline.study import CELL_PARAMS, CURVE, FIGURE, SUMMARY, best_by_validation

log = logging.getLogger(__name__)

PARAMS = ("evaluate", *CELL_PARAMS)
_CHUNK = 2048


def run(config: Config, dataset: str | None = None) -> dict:
    """Score every cell and seed on the test split; write the per-cell files and the summary."""
    from pipeline import evaluation, tracking
    from pipeline.data.datamodule import SplitData
    from pipeline.paths import cell_name

    dataset = dataset or config.data.dataset
    ev = config.evaluate
    with tracking.stage_run("evaluate", config, dataset, PARAMS) as tracked:
        data = SplitData(dataset, ("test",))
        data.setup("test")
        images, labels = data.images["test"], data.labels["test"]
        best = best_by_validation(config)
        rows, features = [], {}
        for init, mode, fraction in config.finetune.cells():
            name = cell_name(init, mode, fraction)
            per_seed = {}
            for seed in config.finetune.seeds:
                probabilities = _probabilities(
                    model_dir(init, mode, fraction), seed, images, features
                )
                result = evaluation.evaluate(
                    probabilities, labels, data.num_classes, ev.bootstrap, ev.seed, ev.ece_bins
                )
                per_seed[str(seed)] = result
                rows.append(
                    {
                        "init": init,
                        "mode": mode,
                        "fraction": paths.fraction_name(fraction),
                        "seed": seed,
                        **result,
                    }
                )
            write_json(Path("metrics/eval") / f"{name}.json", {"cell": name, "seeds": per_seed})
        summaries = evaluation.summarize_all(rows)
        _write_summary(config, summaries)
        tracked.log_metrics(
            {
                f"{evaluation.METRICS[name].key}.{s['init']}-{s['mode']}-{s['fraction']}": s["mean"]
                for name, summary in summaries.items()
                for s in summary
            }
        )
        summary = summaries[evaluation.HEADLINE]
        for path in (SUMMARY.with_suffix(".md"), SUMMARY.with_suffix(".json"), FIGURE):
            tracked.log_artifact(path)
        _log_best_models(tracked, best, dataset)
    return {"summary": summary, "best_by_validation": {k: v[1:3] for k, v in best.items()}}


def _probabilities(folder: Path, seed: int, images: Any, features: dict[str, Any]) -> Any:
    """The classifier's test probabilities. Test features are computed once per distinct
    encoder (the linear and kNN cells of an init share its frozen encoder; ``features`` caches
    them by a hash of the weights), which cuts evaluation's forward passes by more than half."""
    import torch

    from pipeline.augment import BatchAugment
    from pipeline.models import classifier
    from pipeline.models.encoders import encode

    model, description = classifier.load(folder, seed)
    size = description["image_size"]
    normalize = BatchAugment(
        {}, (size, size), description["in_channels"], description["mean"], description["std"]
    )
    key = _weights_key(model.encoder) + repr((description["mean"], description["std"], size))
    if key not in features:
        features[key] = encode(model.encoder, normalize, images, _CHUNK)
    with torch.no_grad():
        return model.from_features(features[key])


def _weights_key(encoder: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_summary(config: Config, summaries: dict[str, list[dict]]) -> None:
    """The summary of every metric (JSON, CSV, Markdown), the curve and the accuracy figure."""
    from pipeline import evaluation

    fractions = [paths.fraction_name(f) for f in config.finetune.fractions]
    write_json(SUMMARY.with_suffix(".json"), evaluation.summary_document(summaries))
    write_text(SUMMARY.with_suffix(".csv"), evaluation.summary_csv(summaries))
    write_text(SUMMARY.with_suffix(".md"), evaluation.summary_markdown(summaries, fractions))
    write_text(CURVE, evaluation.curve_csv(summaries))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    evaluation.label_efficiency_figure(summaries[evaluation.HEADLINE], FIGURE)


#: The alias of the version the newest evaluation registered ("latest" is MLflow's, reserved).
ALIAS = "current"


def registered_name(dataset: str, fraction: str) -> str:
    """The Model Registry name of the best classifier at one label fraction, stable across runs:
    ``fashion_mnist-best-0_01`` (MLflow model names refuse dots)."""
    return f"{dataset}-best-{paths.metric_key(fraction)}"


def _log_best_models(tracked: Any, best: dict[str, tuple], dataset: str) -> None:
    """Per label fraction, the cell with the best validation accuracy, as an MLflow pyfunc model
    registered under :func:`registered_name` with the alias ``current``.

    The model is logged as code (pipeline/serving.py) with the classifier's own folder
    (``model.json`` + ``seed<k>.pt`` plain state_dicts) as its artifact: nothing is pickled, and
    loading it, by ``mlflow models serve`` too, reads the weights with
    ``torch.load(weights_only=True)``.
    """
    import mlflow

    from pipeline import serving, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())
    # Every cell of one study has the same classes and image shape: the first one's say which.
    first = json.loads((model_dir(*next(iter(best.values()))[1:]) / "model.json").read_text())
    signature = serving.signature(first)  # N x H x W x C uint8 in, as `pipeline predict` reads
    requirements = _requirements()
    with mlflow.start_run(run_id=tracked.run_id, log_system_metrics=False):
        for fraction, (validation, init, mode, value) in sorted(best.items()):
            cell = f"{init}-{mode}"
            name = registered_name(dataset, fraction)
            # Not retried as a whole: a second try could log the model twice. Each of its
            # store calls waits out a lock (tracking.BUSY_TIMEOUT_S).
            info = mlflow.pyfunc.log_model(
                name=f"best-{paths.metric_key(fraction)}",
                python_model=serving.__file__,
                artifacts={"classifier": str(model_dir(init, mode, value))},
                signature=signature,
                pip_requirements=requirements,
                registered_model_name=name,
                await_registration_for=0,
                tags={"cell": cell, "fraction": fraction, "validation_accuracy": validation},
            )
            version = info.registered_model_version
            tracked.client.set_registered_model_alias(name, ALIAS, version)
            tracked.client.set_model_version_tag(name, version, "cell", cell)
            tracked.set_tags(
                {
                    f"best.{fraction}": f"{cell} (validation {validation:.4f})",
                    f"registered.{fraction}": f"{name} v{version}",
                }
            )
            log.info(
                "best at %s labels: %s, registered as models:/%s@%s (version %s)",
                fraction,
                cell,
                name,
                ALIAS,
                version,
            )
    # mlflow.start_run's exit marked the stage's run FINISHED; tracking.stage_run ends it.


def _requirements() -> list[str]:
    """What serving the model needs: the pipeline's pinned runtime dependencies (the pipeline
    package itself is installed from its repository: pip install -e <clone>). Given, not
    inferred: MLflow's inference would load the model in a subprocess at every logging."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in requires("pipeline") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []
