"""visualize stage: the study as one page a person opens offline, ``reports/index.html``.

Sections follow the pipeline: the data, the augmentations, pretraining (curves, VAE pictures),
what each encoder learned (first-layer filters, feature maps, Deconvnet, 2-D embeddings),
fine-tuning curves, the evaluation (the accuracy table, the other metrics' tables folded
beneath it, label-efficiency figure with confidence intervals, confusion matrices), where the
classifiers look (CAM, or Grad-CAM where CAM does not apply, said in the report), the course's
toy decision boundaries, and the run (params, git commit, MLflow run ids).

The stage reads the test split for pictures only: every choice it shows (best cell per fraction,
best epoch, kNN k) was made on validation by the earlier stages, and it makes none of its own.

Outputs: ``reports/index.html`` (self-contained: images embedded) and the same figures as PNGs
in ``reports/figures/visualize/``; both are also logged to the stage's MLflow run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import paths
from pipeline.config import Config
from pipeline.documents import PolicyDocument
from pipeline.errors import MissingInputError
from pipeline.io import atomic_dir, read_json, write_text
from pipeline.study import CELL_PARAMS

if TYPE_CHECKING:  # torch, MLflow and the figure modules load inside the stage, not at --help
    import torch
    from mlflow.entities import Run
    from torch import nn

    from pipeline.evaluation import AnswerEntry
    from pipeline.tracking import TrackedRun
    from pipeline.viz.cam import Explanation
    from pipeline.viz.report import Section, Table

log = logging.getLogger(__name__)

PARAMS = ("visualize", "pretrain.methods", *CELL_PARAMS)
REPORT = Path("reports/index.html")
FIGURES = Path("reports/figures/visualize")
_CHUNK = 1024
_SIDE_BY_SIDE = 16  # samples per generative model in the side-by-side figure
#: metrics/summary.json as parsed: ``test_<metric>`` -> cell -> fraction key -> statistics, and
#: ``answer`` -> fraction key -> the answer's entry (``evaluation.AnswerEntry``).
SummaryJSON = dict[str, dict[str, dict[str, object]]]


@dataclass
class _Study:
    """What every section reads: the config, the data on the device, where figures go."""

    config: Config
    dataset: str
    out: Path
    device: torch.device
    classes: list[str]
    document: PolicyDocument
    images: dict[str, torch.Tensor]  # uint8 N x C x H x W tensors (CPU) by split
    labels: dict[str, torch.Tensor]  # int64 N by split
    tracked: TrackedRun
    figures: list[Path] = field(default_factory=list)
    encoders: dict[str, nn.Module] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        path = self.out / f"{name}.png"
        self.figures.append(path)
        return path

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        """Float images on the device, normalized with the training split's statistics."""
        normalize = self.document.normalizer().to(self.device)
        return normalize(images.to(self.device))

    def encoder(self, method: str) -> nn.Module:
        """The method's pretrained encoder on the device, in eval mode, loaded once per run
        (the encoder figures and the embeddings both need it)."""
        from pipeline.models.encoders import load_encoder

        if method not in self.encoders:
            self.encoders[method] = load_encoder(method)[0].to(self.device).eval()
        return self.encoders[method]


def run(config: Config, dataset: str | None = None) -> dict:
    """Draw every figure, write the page, log both to MLflow."""
    import torch

    from pipeline import tracking
    from pipeline.data.datamodule import SplitData
    from pipeline.viz import report

    dataset = dataset or config.data.dataset
    document = PolicyDocument.read(dataset)
    with tracking.stage_run("visualize", config, dataset, PARAMS) as tracked:
        data = SplitData(dataset, ("train", "test"))
        data.setup("test")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with atomic_dir(FIGURES) as out:
            study = _Study(
                config,
                dataset,
                out,
                device,
                data.classes,
                document,
                data.images,
                data.labels,
                tracked,
            )
            builders = (
                _data,
                _augmentation,
                _pretraining,
                _encoders,
                _embeddings,
                _finetuning,
                _evaluation,
                _interpretation,
                _course,
                _run,
            )
            sections = []
            for build in builders:
                log.info("visualize: %s", build.__name__.strip("_"))
                sections.append(build(study))
            names = [p.name for p in study.figures]
        meta = _meta(config, dataset)
        write_text(REPORT, report.render(f"Label efficiency on {dataset}", meta, sections))
        for name in names:
            tracked.log_artifact(FIGURES / name, "figures")
        tracked.log_artifact(REPORT)
        tracked.log_metrics({"figures": len(names)})
    log.info("wrote %s with %d figures", REPORT, len(names))
    return {"report": str(REPORT), "figures": names}


def _meta(config: Config, dataset: str) -> list[tuple[str, str]]:
    from datetime import UTC, datetime

    from pipeline import tracking

    commit, dirty = tracking.git_state()
    return [
        ("dataset", dataset),
        ("git commit", commit[:12] + (" (uncommitted changes)" if dirty else "")),
        ("pipeline id", tracking.pipeline_id(config, commit)),
        ("made", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
    ]


# ------------------------------------------------------------------------------ data


def _data(study: _Study) -> Section:
    from pipeline.data.split import verified_report
    from pipeline.viz import plots
    from pipeline.viz.report import Section, Table

    section = Section("data", "Data")
    split = verified_report(study.dataset)  # checked like every split file a stage reads
    sizes = split.get("sets", {})
    section.paragraphs.append(
        f"{study.dataset}: {len(study.classes)} classes, images of "
        f"{' x '.join(str(s) for s in study.images['train'].shape[1:])} (channels x height x "
        "width). The official test set is the test split; validation is a stratified, seeded "
        "part of the training set; the labeled subsets are nested (the smaller inside the larger)."
    )
    rows = [[name, _count(info)] for name, info in sizes.items()]
    if rows:
        section.table(Table(["split", "images"], rows), "Split sizes (data/splits/…/report.json)")
    train = study.images["train"].permute(0, 2, 3, 1).numpy()
    grid = plots.samples_per_class(train, study.labels["train"].numpy(), study.classes, 10)
    section.figure(
        plots.image_grid_figure(grid, study.path("samples")), "Ten training images of every class."
    )
    return section


def _count(info: object) -> str:
    if isinstance(info, dict):
        for key in ("size", "count", "n", "images"):
            if key in info:
                return str(info[key])
    return str(info)


def _augmentation(study: _Study) -> Section:
    from pipeline.viz.report import Section

    section = Section("augment", "Augmentation")
    preview = paths.augment_dir(study.dataset) / "preview.png"
    section.paragraphs.append(
        "Each row is one training image and views drawn from the augmentation policies "
        "(params.yaml, augment.policies): the strong views self-supervised pretraining compares, "
        "and the mild, label-preserving ones fine-tuning trains on."
    )
    if preview.is_file():
        section.figure(preview, "The augment stage's preview (data/augment/…/preview.png).")
    else:
        section.note(f"{preview} is missing: run the augment stage to draw it.")
    return section


# ------------------------------------------------------------------------------ pretraining


def _pretraining(study: _Study) -> Section:
    from pipeline.viz import plots
    from pipeline.viz.report import Section, Table

    section = Section("pretrain", "Self-supervised pretraining")
    methods = study.config.pretrain.methods
    section.paragraphs.append(
        "One encoder per method, the same backbone for all, trained without labels. The "
        "validation monitors use labels only to measure: a kNN classifier and a linear probe on "
        "the frozen features (kNN: the best k and temperature on validation). scratch is the "
        "untrained initialization, pixels the normalized pixels themselves and pca the linear "
        "baseline: a self-supervised encoder is worth its cost only if its kNN accuracy beats "
        "theirs."
    )
    rows, curves = [], {}
    for method in methods:
        final_path, curve_path = paths.pretrain_metrics(method)
        final = _read(final_path, f"python -m pipeline pretrain --method {method}")
        rows.append(
            [
                method,
                _fmt(final.get("train_loss"), 4),
                _fmt(final.get("val_knn_acc")),
                _fmt(final.get("val_probe_acc")),
            ]
        )
        if curve_path.is_file():
            curves[method] = plots.read_curve(curve_path)
    best = _best_cells(rows, columns=(2, 3))
    section.table(
        Table(["method", "final train loss", "val kNN acc", "val probe acc"], rows, best),
        "Final monitors (metrics/pretrain/<method>.json)",
    )
    trained = {m: c for m, c in curves.items() if len(c.get("epoch", [])) > 1}
    if trained:
        section.figure(
            plots.pretrain_curves_figure(trained, study.path("pretrain_curves")),
            "Training loss (grey, left axis) and validation monitors (right axis) per epoch.",
        )
    _generative_models(study, section, methods, curves)
    return section


def _generative_models(
    study: _Study,
    section: Section,
    methods: tuple[str, ...],
    curves: dict[str, dict[str, np.ndarray]],
) -> None:
    """The pictures each method saved (the VAE's and the GAN's), its own monitors (the GAN's
    D and G), and the generative models' samples side by side."""
    from pipeline.models.pretrain import IMPLEMENTATIONS
    from pipeline.viz import plots

    side_by_side = []
    for method in methods:
        implementation = IMPLEMENTATIONS.get(method)
        names = getattr(implementation, "PICTURES", ())
        folder = paths.pretrain_dir(method)
        if not names or not all((folder / f"{name}.npy").is_file() for name in names):
            continue
        if not side_by_side:
            section.heading("Generative models")
        grids = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in names}
        section.figure(
            plots.image_grid_figure(_picture_rows(grids), study.path(method)),
            implementation.PICTURES_CAPTION,
        )
        columns = [c for c in getattr(implementation, "CURVES", ()) if c in curves.get(method, {})]
        if columns and len(curves[method]["epoch"]) > 1:
            section.figure(
                plots.monitors_figure(
                    curves[method], columns, study.path(f"{method}_monitors"), method
                ),
                f"{method}: its own monitors per epoch (metrics/pretrain/{method}.csv).",
            )
        samples = getattr(implementation, "SAMPLES", None)
        if samples in grids:
            side_by_side.append((method, grids[samples][:_SIDE_BY_SIDE]))
    if len(side_by_side) > 1:
        section.figure(
            plots.image_grid_figure(side_by_side, study.path("generative_samples")),
            "Samples of each generative model, side by side: "
            f"{', '.join(m for m, _ in side_by_side)} (the first {_SIDE_BY_SIDE} "
            "of each; not chosen).",
        )


def _picture_rows(
    grids: dict[str, np.ndarray], per_row: int = _SIDE_BY_SIDE, chunks: int = 2
) -> list[tuple[str, np.ndarray]]:
    """A method's picture grids as rows of ``per_row`` images, interleaved chunk by chunk, so
    that row-aligned grids (the VAE's images and their reconstructions) stay one above the
    other; at most ``chunks`` chunks (the page stays readable; the .npy files hold them all)."""
    rows = []
    for chunk in range(chunks):
        part = slice(chunk * per_row, (chunk + 1) * per_row)
        rows += [
            (name if chunk == 0 else "", images[part])
            for name, images in grids.items()
            if len(images[part])
        ]
    return rows


def _encoders(study: _Study) -> Section:
    """Per encoder: first-layer filters, feature maps of one image, Deconvnet patches."""
    from pipeline.viz import deconv, features
    from pipeline.viz.report import Section

    section = Section("encoders", "What each encoder learned")
    section.paragraphs.append(
        "First-layer filters, the feature maps of one test image, and, for convolutional "
        "encoders, Deconvnet projections (Zeiler & Fergus 2013) of the strongest activations of a "
        "few channels in several layers, next to the test-image patches that caused them."
    )
    vis = study.config.visualize
    test = study.images["test"]
    image_uint8 = test[:1].permute(0, 2, 3, 1).numpy()[0]
    pool = study.normalized(test[: vis.deconv_images])
    pool_uint8 = test[: vis.deconv_images].permute(0, 2, 3, 1).numpy()
    for method in study.config.pretrain.methods:
        encoder = study.encoder(method)
        section.heading(method)
        final = _read(
            paths.pretrain_metrics(method)[0], f"python -m pipeline pretrain --method {method}"
        )
        section.text(_learned_from(method, final, len(study.images["train"])))
        if method == "pixels":
            section.note(
                "pixels: the raw-pixel baseline has no weights; its features are the "
                "normalized pixels themselves."
            )
            continue
        filters = features.first_layer_filters(encoder)
        section.figure(
            features.filters_figure(
                filters, study.path(f"filters_{method}"), f"{method}: first-layer filters"
            ),
            _filters_caption(encoder),
        )
        if not _is_backbone(encoder) or not encoder.has_gap:
            section.note(
                f"{method}: no spatial feature maps or Deconvnet: the encoder "
                f"({_kind(encoder)}) has no convolutional layers."
            )
            continue
        maps = features.feature_maps(encoder, study.normalized(test[:1]))
        section.figure(
            features.feature_maps_figure(
                image_uint8,
                maps,
                study.path(f"feature_maps_{method}"),
                f"{method}: feature maps of one test image",
            ),
            "The first channels of each layer's output for the image on the left.",
        )
        if not deconv.supports(encoder):
            section.note(f"{method}: the Deconvnet does not support this encoder.")
            continue
        net = deconv.Deconvnet(encoder)
        entries = []
        for layer in _spread(net.layers, 3):
            channels = deconv.choose_channels(net, pool, layer, vis.deconv_channels)
            entries += [
                (layer, patches)
                for patches in deconv.top_activations(net, pool, layer, channels, vis.deconv_top)
            ]
        section.figure(
            deconv.deconv_figure(
                entries, pool_uint8, study.path(f"deconv_{method}"), f"{method}: Deconvnet"
            ),
            "Per layer and channel: the projections of the top activations back to "
            "pixel space (left) and the test-image patches that caused them (right).",
        )
    return section


#: The reference encoders that learn from no image, and what they are instead.
_UNTRAINED = {
    "scratch": "the seeded random initialization, never trained",
    "pixels": "the raw-pixel baseline",
}


def _learned_from(method: str, final: dict, train_images: int) -> str:
    """How many images ``method``'s encoder learned from, as the report says it (issue 25).

    ``final`` is its metrics/pretrain/<method>.json: with a pool, pretraining records
    ``images_seen`` (training + pool) and ``pool_images`` there; without one it records neither,
    and the encoder saw the training split, ``train_images``. Said per encoder because a pool
    changes what a self-supervised encoder saw, never what a labeled baseline saw.
    """
    if method in _UNTRAINED:
        return f"{method} learned from no images: {_UNTRAINED[method]}."
    if "images_seen" in final and "pool_images" in final:
        pool = int(final["pool_images"])
        training = int(final["images_seen"]) - pool
        return f"{method} learned from {training} training + {pool} pool images."
    return f"{method} learned from {train_images} training images."


def _embeddings(study: _Study) -> Section:
    import torch

    from pipeline.models.encoders import encode
    from pipeline.viz import embedding
    from pipeline.viz.report import Section

    vis = study.config.visualize
    section = Section("embeddings", "The test set in two dimensions")
    section.paragraphs.append(
        f"{vis.embedding_images} test images (a seeded random sample), their features from each "
        f"encoder mapped to 2-D with {' and '.join(m.upper() if m == 'umap' else 't-SNE' for m in vis.embeddings)}, "  # noqa: E501
        "coloured by class. The number in each title is the fraction of a point's 10 nearest "
        "neighbours in the picture that share its class: the picture's evidence in one number."
    )
    rng = np.random.default_rng(vis.seed)
    count = min(vis.embedding_images, len(study.labels["test"]))
    index = torch.from_numpy(np.sort(rng.choice(len(study.labels["test"]), count, replace=False)))
    images = study.images["test"][index]
    labels = study.labels["test"][index].numpy()
    panels = []
    for method in study.config.pretrain.methods:
        feats = encode(study.encoder(method), study.normalized, images, _CHUNK).cpu()
        for kind in vis.embeddings:
            points = embedding.embed(feats.numpy(), kind, vis.seed)
            panels.append((f"{method} · {'t-SNE' if kind == 'tsne' else 'UMAP'}", points))
    section.figure(
        embedding.embedding_figure(
            panels, labels, study.classes, study.path("embeddings"), "Test-set embeddings"
        ),
        "Each panel: one encoder and one embedding method.",
    )
    return section


# ------------------------------------------------------------------------------ fine-tuning


def _finetuning(study: _Study) -> Section:
    from pipeline.paths import curve_path
    from pipeline.viz import plots
    from pipeline.viz.report import Section

    section = Section("finetune", "Fine-tuning")
    ft = study.config.finetune
    section.paragraphs.append(
        f"Every init x mode x label fraction, {len(ft.seeds)} seed(s) each: linear (frozen "
        "encoder, linear classifier), finetune (all layers; the encoder at a lower learning "
        "rate) and knn (weighted kNN on frozen features). The epoch, and kNN's k and "
        "temperature, are chosen on validation accuracy. Lines are the mean over seeds."
    )
    curves: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for init, mode, fraction in ft.cells():
        path = curve_path(init, mode, fraction)
        if not path.is_file():
            raise MissingInputError(f"{path} is missing; run the finetune stage for that cell")
        fraction_key = paths.fraction_name(fraction)
        curves.setdefault(fraction_key, {})[f"{init}-{mode}"] = plots.read_curve(path)
    section.figure(
        plots.finetune_curves_figure(curves, study.path("finetune_curves")),
        "Validation accuracy per epoch (kNN cells: one point).",
    )
    section.paragraphs.append(
        f"The budget: every init gets the same one at a label fraction, and it grows with the "
        f"subset: at most max({ft.min_steps}, {ft.max_passes} passes) optimizer steps, stopping "
        f"early after {ft.patience} epochs without a better validation accuracy. † marks a seed "
        "that was still improving (its best epoch was its last) when it hit the cap: more "
        "budget might have helped it."
    )
    section.table(
        _budget_table(study.config), "Why each seed stopped (metrics/finetune/<cell>.json)"
    )
    return section


def _budget_table(config: Config) -> Table:
    from pipeline.paths import cell_name, metrics_path
    from pipeline.viz.report import Table

    rows = []
    for init, mode, fraction in config.finetune.cells():
        cell = _read(metrics_path(init, mode, fraction), "python -m pipeline finetune")
        if "budget" not in cell:
            continue  # kNN: nothing is trained
        seeds = [cell["seeds"][k] for k in sorted(cell["seeds"], key=int)]
        stops = ", ".join(
            f"{s['stopped'].replace('_', ' ')}{' †' if s.get('improving_at_cap') else ''}"
            for s in seeds
        )
        rows.append(
            [
                cell_name(init, mode, fraction),
                str(cell["budget"]["cap_steps"]),
                str(cell["budget"]["max_epochs"]),
                ", ".join(f"{s['best_epoch']}/{s['epochs_run']}" for s in seeds),
                stops,
            ]
        )
    return Table(
        ["cell", "cap (steps)", "cap (epochs)", "best / run epochs per seed", "stopped"], rows
    )


# ------------------------------------------------------------------------------ evaluation


def _evaluation(study: _Study) -> Section:
    from pipeline import evaluation
    from pipeline.paths import cell_name
    from pipeline.study import FIGURE, SUMMARY, best_by_validation
    from pipeline.viz import plots
    from pipeline.viz.report import Section

    section = Section("evaluate", "Evaluation on the test split")
    document = _read(SUMMARY.with_suffix(".json"), "python -m pipeline evaluate")
    headline = evaluation.METRICS[evaluation.HEADLINE]
    others = ", ".join(m.title for m in evaluation.METRICS.values() if m is not headline)
    section.paragraphs.append(
        f"Test {headline.title}, mean ± standard deviation over seeds, with the mean of the "
        "seeds' bootstrap 95 % intervals. The best of each column is marked. The other metrics "
        f"({others}) are folded beneath it: open one to see its table. The test split is read "
        "once, here; nothing was chosen on it."
    )
    _metric_tables(study, section, document)
    section.paragraphs.append(_answer(study.config, document))
    if study.config.split.val_labels_per_class is not None:
        section.paragraphs.append(_validation_budget(study.config))
    if FIGURE.is_file():
        section.figure(FIGURE, "Test accuracy against the labeled fraction, 95 % intervals.")
    best = best_by_validation(study.config)
    matrices = []
    for fraction in (paths.fraction_name(f) for f in study.config.finetune.fractions):
        _, init, mode, value = best[fraction]
        name = cell_name(init, mode, value)
        cell = _read(Path("metrics/eval") / f"{name}.json", "python -m pipeline evaluate")
        first = sorted(cell["seeds"], key=int)[0]
        matrix = np.array(cell["seeds"][first]["confusion_matrix"])
        matrices.append((f"{name} (seed {first})", matrix))
    section.figure(
        plots.confusion_figure(matrices, study.classes, study.path("confusion")),
        "Confusion matrices of the best classifier of each label fraction (chosen on "
        "validation); rows are true classes, shading the row-normalized rate.",
    )
    return section


def _metric_tables(study: _Study, section: Section, document: SummaryJSON) -> None:
    """One table per metric of the registry, formatted by ``evaluation.summary_table`` like
    metrics/summary.md: the headline metric's shown, every other folded under its meaning."""
    from pipeline import evaluation
    from pipeline.study import SUMMARY
    from pipeline.viz.report import Table

    cells = [(i, m, paths.fraction_name(f)) for i, m, f in study.config.finetune.cells()]
    try:
        summaries = evaluation.read_summary(document, cells)
    except ValueError as err:
        raise MissingInputError(
            f"{SUMMARY.with_suffix('.json')}: {err}; run python -m pipeline evaluate"
        ) from None
    fractions = [paths.fraction_name(f) for f in study.config.finetune.fractions]
    capped = _improving_at_cap(study.config)
    for name in sorted(summaries, key=lambda n: n != evaluation.HEADLINE):
        table = evaluation.summary_table(summaries[name], fractions, name, capped)
        metric = evaluation.METRICS[name]
        section.table(
            Table(table.header, table.rows, table.best),
            f"{table.caption} From metrics/summary.json; † a seed of the cell was still "
            "improving at its cap.",
            folded="" if name == evaluation.HEADLINE else f"{metric.title}: {metric.meaning}",
        )


def _improving_at_cap(config: Config) -> set[tuple[str, str, str]]:
    """(init, mode, fraction) of the cells with a seed still improving when it hit its cap."""
    from pipeline.paths import metrics_path

    marked = set()
    for init, mode, fraction in config.finetune.cells():
        cell = _read(metrics_path(init, mode, fraction), "python -m pipeline finetune")
        if any(s.get("improving_at_cap") for s in cell["seeds"].values()):
            marked.add((init, mode, paths.fraction_name(fraction)))
    return marked


def _validation_budget(config: Config) -> str:
    """The line beside the answer that says how many validation labels chose its cells."""
    per_class = config.split.val_labels_per_class
    return (
        f"Validation budget: every choice above (epochs, kNN k and temperature, the best cell) "
        f"was made on {per_class} labeled validation images per class (split.val_labels_per_class"
        "), not on the whole validation split."
    )


def _answer(config: Config, document: SummaryJSON) -> str:
    """The study's answer in one sentence, as summary.md ends with it: per label fraction, the
    best self-supervised cell against the best baseline (scratch, pixels or PCA), both chosen on
    validation, with the paired interval the evaluate stage computed (this stage sees no
    per-image predictions of the cells, so it reads the interval, it does not make one)."""
    from pipeline import evaluation
    from pipeline.study import SUMMARY

    if "answer" not in document:
        raise MissingInputError(
            f"{SUMMARY.with_suffix('.json')} has no 'answer': it was written before the paired "
            "interval of the study's answer; run python -m pipeline evaluate"
        )
    answer: dict[str, AnswerEntry] = document["answer"]
    keys = [paths.metric_key(f) for f in config.finetune.fractions]
    return evaluation.answer_sentence([answer[key] for key in keys if key in answer])


# ------------------------------------------------------------------------------ interpretation


def _interpretation(study: _Study) -> Section:
    """Per init: where its best classifier (largest fraction, chosen on validation) looks."""
    import torch

    from pipeline.models import classifier as classifiers
    from pipeline.paths import cell_name, metrics_path, model_dir
    from pipeline.study import validation_accuracy
    from pipeline.viz import cam
    from pipeline.viz.report import Section

    vis = study.config.visualize
    ft = study.config.finetune
    section = Section("interpret", "Where the classifiers look")
    section.paragraphs.append(
        "Class activation maps (Zhou et al. 2016): for the predicted class c, "
        "M_c(x, y) = Σ_k w_ck h_k(x, y) over the maps before global average pooling, upsampled to "
        "the image. Where CAM does not apply (no global average pooling, or no linear head) the "
        "map is Grad-CAM, and the figure says so. Per class: correct predictions (✓) and mistakes "
        "(✗, with the predicted class)."
    )
    fraction = max(ft.fractions, key=paths.budget_size)
    rng = np.random.default_rng(vis.seed)
    order = torch.from_numpy(rng.permutation(len(study.labels["test"])))
    for init in ft.inits:
        modes = [m for i, m, f in ft.cells() if i == init and f == fraction]  # semi too, if run
        mode = max(modes, key=lambda m: validation_accuracy(metrics_path(init, m, fraction)))
        model, _ = classifiers.load(model_dir(init, mode, fraction))
        model = model.to(study.device)
        rows, explanation = _cam_rows(study, model, order)
        name = cell_name(init, mode, fraction)
        path = cam.cam_figure(rows, study.path(f"cam_{init}"), f"{name}: {explanation.method}")
        if explanation.method != "CAM":
            section.note(f"{name}: {explanation.reason}")
        section.figure(
            path,
            f"{name} (the best mode of {init} at {paths.budget_label(fraction)} "
            f"labels on validation): {explanation.reason}",
        )
    return section


def _cam_rows(
    study: _Study, model: nn.Module, order: torch.Tensor
) -> tuple[list[tuple[str, np.ndarray, list[str]]], Explanation]:
    """Per class, the first correct and the first wrong test predictions (in a seeded order),
    overlaid with the map of the predicted class: (class name, overlays, captions) rows."""
    import torch

    from pipeline.viz import cam

    test, truth = study.images["test"][order], study.labels["test"][order]
    with torch.no_grad():
        predicted = torch.cat(
            [model(study.normalized(chunk)).argmax(1).cpu() for chunk in test.split(_CHUNK)]
        )
    count = study.config.visualize.cam_examples
    chosen, captions = [], []
    for k, name in enumerate(study.classes):
        right = torch.nonzero((truth == k) & (predicted == k)).flatten()[:count]
        wrong = torch.nonzero((truth == k) & (predicted != k)).flatten()[:count]
        chosen.append(torch.cat([right, wrong]))
        captions.append(
            [f"✓ {name}" for _ in right]
            + [f"✗ as {study.classes[int(predicted[i])]}" for i in wrong]
        )
    picks = torch.cat(chosen)
    images = test[picks]
    explanation = cam.explain(model, study.normalized(images), predicted[picks].to(study.device))
    overlays = cam.overlay(images.permute(0, 2, 3, 1).numpy(), explanation.maps.cpu().numpy())
    rows, start = [], 0
    for k, name in enumerate(study.classes):
        rows.append((name, overlays[start : start + len(chosen[k])], captions[k]))
        start += len(chosen[k])
    return rows, explanation


# ------------------------------------------------------------------------------ the course


def _course(study: _Study) -> Section:
    from pipeline.viz import toy
    from pipeline.viz.report import Section

    t = study.config.visualize.toy
    section = Section("course", "Why depth and non-linearity matter")
    section.paragraphs.append(
        f"Small MLPs ({t['activation']} activations) trained on the 2-D {t['dataset']} data "
        f"({t['samples']} points, noise {t['noise']}), one per depth x width; depth 0 is "
        "logistic regression. Shading is the predicted probability of the second class: a linear "
        "model can only cut the plane with a straight line; hidden layers with a non-linearity "
        "bend it, and more width and depth bend it more."
    )
    X, y = toy.make_toy(t["dataset"], t["samples"], t["noise"], study.config.visualize.seed)
    results = toy.decision_boundary_grid(
        X,
        y,
        t["depths"],
        t["widths"],
        t["activation"],
        t["steps"],
        t["lr"],
        study.config.visualize.seed,
    )
    section.figure(
        toy.decision_boundary_figure(
            results, X, y, study.path("decision_boundaries"), f"MLPs on {t['dataset']}"
        ),
        "Rows: depth (hidden layers); columns: width (units per layer). Titles: "
        "training accuracy and parameter count.",
    )
    return section


# ------------------------------------------------------------------------------ the run


def _run(study: _Study) -> Section:
    import yaml

    from pipeline import tracking
    from pipeline.viz.report import Section, Table

    section = Section("run", "The run")
    commit, dirty = tracking.git_state()
    section.paragraphs.append(
        f"git commit {commit}{' with uncommitted changes' if dirty else ''}; MLflow store "
        f"{tracking.tracking_uri()}, experiment {study.config.tracking.experiment!r}. The table "
        "lists the latest finished MLflow run of every job of this dataset, and this stage's own."
    )
    rows = _mlflow_runs(study)
    section.table(Table(["stage", "job", "run id", "finished (UTC)"], rows), "MLflow runs")
    section.heading("params.yaml (validated, defaults filled in)")
    section.pre(yaml.safe_dump(study.config.raw, sort_keys=False, allow_unicode=True))
    return section


def _mlflow_runs(study: _Study) -> list[list[str]]:
    from datetime import UTC, datetime

    from pipeline import tracking
    from pipeline.cli import PIPELINE_ORDER

    client = tracking.client()
    experiment = client.get_experiment_by_name(study.config.tracking.experiment)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.dataset = '{study.dataset}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    stages = tuple(s for s in PIPELINE_ORDER if s != "visualize")  # the runs before this one
    latest: dict[tuple[str, str], Run] = {}
    for run in runs:
        tags = run.data.tags
        key = (tags.get("stage", "?"), tags.get("method") or tags.get("cell") or "")
        latest.setdefault(key, run)
    rows = []
    for (stage, job), run in sorted(
        latest.items(),
        key=lambda item: (stages.index(item[0][0]) if item[0][0] in stages else 99, item[0][1]),
    ):
        if stage not in stages:
            continue
        when = datetime.fromtimestamp((run.info.end_time or 0) / 1000, UTC)
        rows.append([stage, job, run.info.run_id, when.strftime("%Y-%m-%d %H:%M")])
    rows.append(["visualize", "", study.tracked.run_id, "this run"])
    return rows


# ------------------------------------------------------------------------------ helpers


def _read(path: Path, command: str) -> dict:
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise MissingInputError(f"{path} is missing or unreadable ({err}); run {command}") from None


def _is_backbone(encoder: nn.Module) -> bool:
    from pipeline.models.backbones import Backbone

    return isinstance(encoder, Backbone)


def _kind(encoder: nn.Module) -> str:
    return encoder.config.name if _is_backbone(encoder) else type(encoder).__name__


def _filters_caption(encoder: nn.Module) -> str:
    if not _is_backbone(encoder):
        return 'The principal components ("eigen-images"), each scaled to its own range.'
    return f"The {encoder.config.name} encoder's first-layer weights, each scaled to its own range."


def _spread(items: list[str], count: int) -> list[str]:
    """``count`` items spread from first to last (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _fmt(value: float | str | None, digits: int = 3) -> str:
    """A number for a table; missing or NaN (a monitor the method has not got) is a dash."""
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def _best_cells(rows: list[list[str]], columns: tuple[int, ...]) -> set[tuple[int, int]]:
    best = set()
    for c in columns:
        values = [float(r[c]) if r[c] != "–" else -math.inf for r in rows]
        top = max(values, default=-math.inf)
        best |= {(i, c) for i, v in enumerate(values) if v == top and top > -math.inf}
    return best
