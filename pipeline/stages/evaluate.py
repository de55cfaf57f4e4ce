"""evaluate stage: every classifier of the study on the test split, the only stage that reads it.

Outputs: ``metrics/eval/<init>-<mode>-<fraction>.json`` (per seed: every metric of
``pipeline.evaluation.METRICS`` (accuracy, error, macro-F1, NLL, ECE) with bootstrap 95 %
intervals, per-class accuracy, confusion matrix), ``metrics/summary.{json,csv,md}`` (per metric:
rows init x mode, columns label fractions, mean ± std over seeds with the mean interval),
``metrics/label_efficiency.csv`` (every metric per cell) and
``reports/figures/label_efficiency.png`` (the study's figure, test accuracy). The best classifier
of each label fraction, chosen by *validation* accuracy, is logged to MLflow as a model.

The study's answer: per label fraction, the best self-supervised cell minus the best baseline
cell (``pipeline.study.answer``, both chosen on validation) with a paired bootstrap interval over
the same test images (``evaluation.paired_difference``), in summary.json's ``answer`` and as one
sentence at the end of summary.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import paths
from pipeline.config import Config
from pipeline.io import write_json, write_text
from pipeline.paths import model_dir
from pipeline.study import CELL_PARAMS, CURVE, FIGURE, SUMMARY, best_by_validation

if TYPE_CHECKING:  # torch, numpy and MLflow load inside run(), so --help answers at once
    import numpy as np
    import torch
    from torch import nn

    from pipeline.evaluation import AnswerEntry, SeedReport, SeedRow, SummaryEntry
    from pipeline.tracking import TrackedRun

#: Per (``<init>-<mode>``, fraction name): each seed's per-image correctness on the test split.
Correctness = dict[tuple[str, str], list["np.ndarray"]]

log = logging.getLogger(__name__)

PARAMS = ("evaluate", *CELL_PARAMS)
_CHUNK = 2048


def run(config: Config, dataset: str | None = None) -> dict[str, object]:
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
        rows: list[SeedRow] = []
        features: dict[str, torch.Tensor] = {}
        correct: Correctness = {}
        for init, mode, fraction in config.finetune.cells():
            name = cell_name(init, mode, fraction)
            per_seed: dict[str, SeedReport] = {}
            for seed in config.finetune.seeds:
                probabilities = _probabilities(
                    model_dir(init, mode, fraction), seed, images, features
                )
                result = evaluation.evaluate(
                    probabilities, labels, data.num_classes, ev.bootstrap, ev.seed, ev.ece_bins
                )
                per_seed[str(seed)] = result
                rows.append(
                    evaluation.SeedRow(
                        init=init,
                        mode=mode,
                        fraction=paths.fraction_name(fraction),
                        seed=seed,
                        **result,
                    )
                )
                key = (f"{init}-{mode}", paths.fraction_name(fraction))
                correct.setdefault(key, []).append(
                    evaluation.per_image_correct(probabilities, labels, data.num_classes)
                )
            write_json(Path("metrics/eval") / f"{name}.json", {"cell": name, "seeds": per_seed})
        summaries = evaluation.summarize_all(rows)
        answer = _answer(config, summaries, correct)
        _write_summary(config, summaries, answer)
        tracked.log_metrics(
            {
                f"{evaluation.METRICS[name].key}.{s['init']}-{s['mode']}-{s['fraction']}": s["mean"]
                for name, summary in summaries.items()
                for s in summary
            }
            | {
                f"answer.{budget}.{field}": entry[field]
                for budget, entry in answer.items()
                for field in ("difference", "ci_low", "ci_high")
            }
        )
        summary = summaries[evaluation.HEADLINE]
        for path in (SUMMARY.with_suffix(".md"), SUMMARY.with_suffix(".json"), FIGURE):
            tracked.log_artifact(path)
        _log_best_models(tracked, best, dataset)
    return {
        "summary": summary,
        "best_by_validation": {k: v[1:3] for k, v in best.items()},
        "answer": answer,
    }


def _probabilities(
    folder: Path, seed: int, images: torch.Tensor, features: dict[str, torch.Tensor]
) -> torch.Tensor:
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


def _weights_key(encoder: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _answer(
    config: Config, summaries: dict[str, list[SummaryEntry]], correct: Correctness
) -> dict[str, AnswerEntry]:
    """Per label fraction (keyed as summary.json keys it, ``0_01``): the best self-supervised
    cell minus the best baseline cell, both chosen on validation by ``pipeline.study.answer``
    (never on test), with the paired bootstrap interval over the same test images, seeds
    averaged, under the evaluate section's bootstrap settings."""
    from pipeline import evaluation
    from pipeline.study import answer

    accuracy = evaluation.summary_document(summaries)[evaluation.METRICS["accuracy"].key]
    entries = {}
    for row in answer(config, accuracy):
        fraction, ssl, base = row["fraction"], row["ssl"]["cell"], row["baseline"]["cell"]
        paired = evaluation.paired_difference(
            correct[(ssl, fraction)],
            correct[(base, fraction)],
            config.evaluate.bootstrap,
            config.evaluate.seed,
        )
        entries[paths.metric_key(fraction)] = evaluation.answer_entry(fraction, ssl, base, paired)
    return entries


def _write_summary(
    config: Config, summaries: dict[str, list[SummaryEntry]], answer: dict[str, AnswerEntry]
) -> None:
    """The summary of every metric (JSON, CSV, Markdown) with the study's answer (JSON and
    Markdown), the curve and the accuracy figure."""
    from pipeline import evaluation

    fractions = [paths.fraction_name(f) for f in config.finetune.fractions]
    document = {**evaluation.summary_document(summaries), "answer": answer}
    write_json(SUMMARY.with_suffix(".json"), document)
    write_text(SUMMARY.with_suffix(".csv"), evaluation.summary_csv(summaries))
    ordered = [answer[key] for key in map(paths.metric_key, fractions) if key in answer]
    sentence = evaluation.answer_sentence(ordered)
    write_text(
        SUMMARY.with_suffix(".md"), evaluation.summary_markdown(summaries, fractions, sentence)
    )
    write_text(CURVE, evaluation.curve_csv(summaries))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    evaluation.label_efficiency_figure(summaries[evaluation.HEADLINE], FIGURE)


#: The alias of the version the newest evaluation registered ("latest" is MLflow's, reserved).
ALIAS = "current"


def registered_name(dataset: str, fraction: str) -> str:
    """The Model Registry name of the best classifier at one label fraction, stable across runs:
    ``fashion_mnist-best-0_01`` (MLflow model names refuse dots)."""
    return f"{dataset}-best-{paths.metric_key(fraction)}"


def _log_best_models(
    tracked: TrackedRun, best: dict[str, tuple[float, str, str, float]], dataset: str
) -> None:
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
