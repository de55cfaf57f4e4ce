"""evaluate stage: every classifier of the study on the test split, the only stage that reads it.

Outputs: ``metrics/eval/<init>-<mode>-<fraction>.json`` (per seed: accuracy, error, macro-F1,
NLL, ECE with bootstrap 95 % intervals, per-class accuracy, confusion matrix),
``metrics/summary.{json,csv,md}`` (rows init x mode, columns label fractions, mean ± std over
seeds with the mean interval), ``metrics/label_efficiency.csv`` and
``reports/figures/label_efficiency.png`` (the study's figure). The best classifier of each label
fraction, chosen by *validation* accuracy, is logged to MLflow as a model.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Config
from pipeline.io import write_json, write_text
from pipeline.paths import model_dir
from pipeline.study import CURVE, FIGURE, SUMMARY, best_by_validation

log = logging.getLogger(__name__)

PARAMS = ("evaluate", "finetune.inits", "finetune.baselines", "finetune.baseline_modes",
          "finetune.modes", "finetune.fractions", "finetune.seeds")
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
                probabilities = _probabilities(model_dir(init, mode, fraction), seed, images,
                                               features)  # fmt: skip
                result = evaluation.evaluate(probabilities, labels, data.num_classes,
                                             ev.bootstrap, ev.seed, ev.ece_bins)  # fmt: skip
                per_seed[str(seed)] = result
                rows.append({"init": init, "mode": mode, "fraction": paths.fraction_name(fraction),
                             "seed": seed, **result})  # fmt: skip
            write_json(Path("metrics/eval") / f"{name}.json", {"cell": name, "seeds": per_seed})
        summary = evaluation.summarize(rows)
        _write_summary(config, summary)
        tracked.log_metrics({f"test_accuracy.{s['init']}-{s['mode']}-{s['fraction']}": s["mean"]
                             for s in summary})  # fmt: skip
        for path in (SUMMARY.with_suffix(".md"), SUMMARY.with_suffix(".json"), FIGURE):
            tracked.log_artifact(path)
        _log_best_models(tracked, best)
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
    normalize = BatchAugment({}, (size, size), description["in_channels"], description["mean"],
                             description["std"])  # fmt: skip
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


def _write_summary(config: Config, summary: list[dict]) -> None:
    from pipeline import evaluation

    fractions = [paths.fraction_name(f) for f in config.finetune.fractions]
    nested: dict[str, dict[str, dict]] = {}
    for s in summary:
        cell = {k: s[k] for k in ("mean", "std", "ci_low", "ci_high", "n_seeds")}
        nested.setdefault(f"{s['init']}-{s['mode']}", {})[s["fraction"]] = cell
    write_json(SUMMARY.with_suffix(".json"), {"test_accuracy": nested})
    write_text(SUMMARY.with_suffix(".csv"), evaluation.summary_csv(summary))
    write_text(SUMMARY.with_suffix(".md"), evaluation.summary_markdown(summary, fractions))
    lines = ["fraction,model,accuracy,ci_low,ci_high"]
    lines += [f"{s['fraction']},{s['init']}-{s['mode']},{s['mean']},{s['ci_low']},{s['ci_high']}"
              for s in summary]  # fmt: skip
    write_text(CURVE, "\n".join(lines) + "\n")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    evaluation.label_efficiency_figure(summary, FIGURE)


def _log_best_models(tracked: Any, best: dict[str, tuple]) -> None:
    """Per label fraction, the cell with the best validation accuracy, as an MLflow model.

    The logged model holds the pipeline's own folder (``model.json`` + ``seed<k>.pt`` plain
    state_dicts), not a pickled module: whoever downloads it loads it with
    ``pipeline.models.classifier.load`` (``torch.load(weights_only=True)``), so an untrusted
    store cannot run code on the reader's machine.
    """

    experiment = tracked.client.get_run(tracked.run_id).info.experiment_id
    for fraction, (validation, init, mode, value) in sorted(best.items()):
        cell = f"{init}-{mode}"
        model = tracked.client.create_logged_model(
            experiment, name=f"best-{fraction.replace('.', '_')}",  # MLflow names refuse dots
            source_run_id=tracked.run_id, model_type="pipeline-classifier",
            tags={"cell": cell, "fraction": fraction, "format": "state_dict (weights_only)"},
        )  # fmt: skip
        tracked.client.log_model_artifacts(model.model_id, str(model_dir(init, mode, value)))
        tracked.client.finalize_logged_model(model.model_id, "READY")
        tracked.set_tags({f"best.{fraction}": f"{cell} (validation {validation:.4f})"})
