"""``predict`` classifies image files like the training data; ``compare`` tabulates MLflow runs.

Everything runs in the ``workdir`` tmp folder: a tiny classifier made here (no training), and
runs written straight into the folder's own SQLite MLflow store.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import compare, predict, tracking
from pipeline.config import from_dict
from pipeline.data.formats import load_image
from pipeline.errors import DataError, MissingInputError, PipelineError
from pipeline.models import classifier
from pipeline.models.backbones import BackboneConfig, build_backbone
from pipeline.models.classifier import LinearClassifier
from tests.conftest import REPO, params_for, run, write_params

MEAN, STD = 0.5, 0.25
CLASSES = ["a", "b", "c"]


# --------------------------------------------------------------------------- predict


def _description(feature_dim: int) -> dict:
    return {
        "mode": "linear",
        "init": "scratch",
        "fraction": "1",
        "classes": CLASSES,
        "image_size": 8,
        "in_channels": 1,
        "mean": [MEAN],
        "std": [STD],
        "dropout": 0.0,
        "encoder": {
            "method": "scratch",
            "kind": "backbone",
            "backbone": {"name": "lenet5", "width": 8},
            "in_channels": 1,
            "image_size": 8,
            "feature_dim": feature_dim,
            "mean": [MEAN],
            "std": [STD],
            "dataset": "idx",
            "dataset_checksum": "0",
        },
    }


def _constant(value: int) -> torch.Tensor:
    """A normalized 8x8 grey image of one pixel value, as the classifier sees it."""
    return torch.full((1, 1, 8, 8), (value / 255 - MEAN) / STD)


@pytest.fixture
def model_folder(workdir: Path) -> Path:
    """A tiny classifier whose head separates bright images (class c) from dark ones (class a).

    The head is crafted on the encoder's own features of a white and a black image: class c
    scores along the white - black direction, class a against it, class b stays at 0. So the
    winner depends on the pixels, which shows that the image reached the network as converted.
    """
    torch.manual_seed(0)
    encoder = build_backbone(BackboneConfig(name="lenet5", width=8), 1, 8)
    model = LinearClassifier(encoder, encoder.feature_dim, len(CLASSES)).eval()
    with torch.no_grad():
        white, black = encoder(_constant(255))[0], encoder(_constant(0))[0]
        direction = white - black
        assert direction.norm() > 0, "the random encoder must tell white from black"
        direction = direction * (8.0 / direction.dot(direction))  # margin of 4 logits each side
        middle = (white + black) / 2
        model.head.weight.copy_(torch.stack([-direction, torch.zeros_like(direction), direction]))
        model.head.bias.copy_(
            torch.stack([direction.dot(middle), torch.tensor(0.0), -direction.dot(middle)])
        )
    folder = workdir / "models" / "finetune" / "scratch-linear-1"
    classifier.save(folder, _description(encoder.feature_dim), {0: model.state_dict()})
    return folder


@pytest.fixture
def images(workdir: Path) -> dict[str, Path]:
    """A bright opaque RGBA PNG (50x30), a dark grey JPEG (5x5), and a transparent white PNG.

    Transparency is composited on black, as for training images, so the last one is dark.
    """
    folder = workdir / "images"
    folder.mkdir()
    paths = {
        "bright": folder / "bright.png",
        "dark": folder / "dark.jpg",
        "transparent": folder / "transparent.png",
    }
    Image.new("RGBA", (50, 30), (250, 240, 245, 255)).save(paths["bright"])
    Image.new("L", (5, 5), 10).save(paths["dark"], format="JPEG")
    Image.new("RGBA", (12, 20), (255, 255, 255, 0)).save(paths["transparent"])
    return paths


def test_predictions_follow_the_image_and_are_sorted_probabilities(model_folder, images):
    results = predict.predict(model_folder, [images["bright"], images["dark"]], top_k=3)
    assert [r["image"] for r in results] == [str(images["bright"]), str(images["dark"])]
    for result, winner in zip(results, ["c", "a"], strict=True):
        top = result["top"]
        assert len(top) == 3 and sorted(t["class"] for t in top) == CLASSES
        probabilities = [t["probability"] for t in top]
        assert probabilities == sorted(probabilities, reverse=True)
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-5)
        assert top[0]["class"] == winner and top[0]["probability"] > 0.9
    (transparent,) = predict.predict(model_folder, [images["transparent"]], top_k=1)
    assert [t["class"] for t in transparent["top"]] == ["a"]


def test_predictions_equal_the_module_on_training_style_pixels(model_folder, images):
    """The probabilities are the model's on load_image pixels normalized as in training."""
    (result,) = predict.predict(model_folder, [images["bright"]], top_k=2)
    module, _ = classifier.load(model_folder)
    pixels = load_image(images["bright"], 8, 1)  # 8 x 8 x 1 uint8
    x = (torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255 - MEAN) / STD
    with torch.no_grad():
        expected = module(x)[0]
    got = {t["class"]: t["probability"] for t in result["top"]}
    assert len(got) == 2
    for name, probability in got.items():
        assert probability == pytest.approx(float(expected[CLASSES.index(name)]), abs=1e-6)


def test_top_k_is_capped_by_the_classes_and_must_be_positive(model_folder, images):
    (result,) = predict.predict(model_folder, [images["dark"]], top_k=10)
    assert len(result["top"]) == len(CLASSES)
    for bad in (0, -1):
        with pytest.raises(PipelineError, match="top-k"):
            predict.predict(model_folder, [images["dark"]], top_k=bad)


def test_a_folder_that_is_not_a_classifier_is_named(workdir: Path, images):
    empty = workdir / "models" / "finetune" / "nothing"
    empty.mkdir(parents=True)
    with pytest.raises(MissingInputError, match="nothing is not a classifier"):
        predict.predict(empty, [images["dark"]])


def test_an_unreadable_image_is_named(model_folder, images, workdir: Path):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, format="JPEG")
    truncated = workdir / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="truncated.jpg: not a readable image"):
        predict.predict(model_folder, [images["dark"], truncated])


def _parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--params", default="params.yaml")  # the CLI adds it to every command
    return parser.parse_args(argv)


def test_main_prints_each_image_then_its_classes(model_folder, images, capsys):
    argv = ["--model", str(model_folder), "--top-k", "2", str(images["bright"])]
    args = _parse(predict.add_arguments, argv)
    assert args.seed is None
    assert predict.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images["bright"])
    assert len(lines) == 3
    assert lines[1].startswith("  c  0.9") and len(lines[1].split("  ")[-1]) == len("0.0000")


def _cli_commands() -> set[str]:
    from pipeline.cli import build_parser

    parser = build_parser()
    return {c for action in parser._subparsers._group_actions for c in action.choices}


@pytest.mark.skipif("predict" not in _cli_commands(), reason="the CLI has no predict command yet")
def test_the_cli_predicts_and_reports_bad_input_in_one_line(model_folder, images, workdir):
    write_params(workdir, params_for())  # whether or not the CLI reads it before predicting
    result = run(
        [
            "python",
            "-m",
            "pipeline",
            "predict",
            "--model",
            str(model_folder),
            "--top-k",
            "1",
            str(images["dark"]),
        ],
        workdir,
    )
    first, second = result.stdout.splitlines()
    assert first == str(images["dark"]) and re.fullmatch(r"  a  0\.9\d{3}", second)
    failed = run(
        ["python", "-m", "pipeline", "predict", "--model", str(workdir), str(images["dark"])],
        workdir,
        check=False,
    )
    assert failed.returncode == 1
    assert "is not a classifier" in failed.stderr and "Traceback" not in failed.stderr


# --------------------------------------------------------------------------- compare

EXPERIMENT = "label-efficiency"
STUDY = "study"

#: The one fine-tuning cell both executions ran.
CELL = {"init": "simclr", "mode": "linear", "fraction": "0.1"}
#: (execution, pipeline_id, stage, extra tags, metrics, status); e2 improves on e1.
RUNS = [
    ("e1", "p1", "download", {}, {"n_train": 400}, "FINISHED"),
    ("e1", "p1", "split", {}, {"n_val": 40}, "FINISHED"),
    ("e1", "p1", "pretrain", {"method": "simclr"}, {"final_knn_acc": 0.5}, "FINISHED"),
    ("e1", "p1", "finetune", CELL, {"val_acc": 0.6, "test_accuracy": 0.55}, "FINISHED"),
    ("e2", "p2", "finetune", CELL, {"val_acc": 0.7, "test_accuracy": 0.625}, "FINISHED"),
    ("e2", "p2", "pretrain", {"method": "simclr"}, {"final_knn_acc": 0.75}, "FAILED"),
    ("e2", "p2", "split", {}, {"n_val": 40}, "FINISHED"),
    ("e2", "p2", "download", {}, {"n_train": 400}, "FINISHED"),
]


#: The study's cells as the finetune stage tags them: autoencoder is the longest method name,
#: so its rows are the widest; pixels is the baseline with no weights (kNN and linear only).
CELLS = [
    *(
        (init, mode, fraction)
        for init in ("scratch", "autoencoder")
        for mode in ("linear", "finetune")
        for fraction in ("0.01", "1.0")
    ),
    ("pixels", "knn", "0.01"),
    ("pixels", "knn", "1.0"),
]
#: How much better execution s2 is than s1 on every cell's validation and test accuracy.
GAIN = 0.05


def _study_runs(gain: float) -> list[tuple[str, dict, dict]]:
    """(stage, tags, metrics) of one execution of the study, as each stage logs them."""
    runs: list[tuple[str, dict, dict]] = [
        ("download", {}, {"n_train_images": 400.0, "n_test_images": 100.0}),
        ("split", {}, {"n_train": 360.0, "n_val": 40.0, "n_test": 100.0}),
        ("augment", {}, {}),
    ]
    for method in ("scratch", "autoencoder", "pixels"):
        runs.append(("pretrain", {"method": method}, {"final_knn_acc": 0.4 + gain}))
    tests = {}
    for i, (init, mode, fraction) in enumerate(CELLS):
        cell = f"{init}-{mode}-{fraction}"
        tags = {"init": init, "mode": mode, "fraction": fraction, "cell": cell}
        validation = 0.5 + i / 100 + gain
        runs.append(("finetune", tags, {"val_acc_seed0": validation, "val_acc": validation}))
        tests[f"test_accuracy.{cell}"] = validation - 0.02
    runs += [("evaluate", {}, tests), ("visualize", {}, {"figures": 12.0})]
    return runs


def _log_study(execution: str, gain: float, failing: str | None = None) -> None:
    """One execution of the study through tracking.start_execution and tracking.stage_run (so
    with real seconds, peak memory and system metrics); the ``failing`` stage raises."""
    config = from_dict(params_for(tracking={"experiment": STUDY}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tracking.EXECUTION_ENV, execution)
        patch.setenv(tracking.PARENT_ENV, "")  # start_execution sets it; the patch undoes it
        parent = tracking.start_execution(config, "test")
        for stage, tags, metrics in _study_runs(gain):
            stage_run = tracking.stage_run(stage, config, "idx", [])
            with contextlib.suppress(RuntimeError), stage_run as tracked:
                tracked.set_tags(tags)
                if stage == "finetune":  # Lightning's per-epoch monitors, prefixed per seed
                    tracked.log_metrics({"seed0-val_acc": 0.1}, step=5)
                tracked.log_metrics(metrics)
                if stage == failing:
                    raise RuntimeError(f"{stage} failed")
        tracking.end_execution("FINISHED", parent)


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlflow.db holding two executions of hand-made runs (e2 started after e1, its runs in
    another order), and in experiment STUDY two executions of the study logged the way the
    stages log them (s2 after s1, GAIN better, its visualize stage failed).

    Built once: creating an MLflow SQLite store takes seconds, copying the file does not.
    """
    folder = tmp_path_factory.mktemp("template_store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = tracking.client()
        experiment_id = tracking.ensure_experiment(client, EXPERIMENT)
        for i, (execution, pid, stage, tags, metrics, status) in enumerate(RUNS):
            all_tags = {
                "stage": stage,
                "dataset": "idx",
                "execution": execution,
                "pipeline_id": pid,
                **tags,
            }
            created = client.create_run(
                experiment_id, start_time=1_000_000 + i * 1000, tags=all_tags
            )
            tracking.TrackedRun(client, created.info.run_id).log_metrics(metrics)
            client.set_terminated(created.info.run_id, status=status)
        _log_study("s1", 0.0)
        _log_study("s2", GAIN, failing="visualize")
    return folder / tracking.DEFAULT_DB


@pytest.fixture
def store(workdir: Path, template_store: Path):
    """The two executions in the workdir's own MLflow store (a copy of the template)."""
    shutil.copyfile(template_store, workdir / tracking.DEFAULT_DB)
    client = tracking.client()
    return client, client.get_experiment_by_name(EXPERIMENT).experiment_id


@pytest.fixture
def study(store):
    """(client, experiment id, the runs of s1, the runs of s2) of the study executions."""
    client, _ = store
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    return client, experiment_id, *(compare.runs_of(client, experiment_id, e) for e in ("s1", "s2"))


def _rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The table's data rows by (stage, run), cells split on runs of spaces."""
    lines = text.splitlines()
    return {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:] if line.strip()}


def test_runs_of_matches_execution_or_pipeline_id_and_defaults_to_the_latest(store):
    client, experiment_id = store
    e1 = compare.runs_of(client, experiment_id, "e1")
    assert [r.data.tags["stage"] for r in e1] == ["download", "split", "pretrain", "finetune"]
    by_pid = compare.runs_of(client, experiment_id, "p1")
    assert [r.info.run_id for r in by_pid] == [r.info.run_id for r in e1]
    latest = compare.runs_of(client, experiment_id, None)
    assert {r.data.tags["execution"] for r in latest} == {"e2"} and len(latest) == 4
    assert compare.runs_of(client, experiment_id, "it's-not-there") == []


def test_one_execution_lists_each_run_in_pipeline_order(store):
    client, experiment_id = store
    text = compare.table(compare.runs_of(client, experiment_id, "e2"))
    header = text.splitlines()[0].split()
    assert header == [
        "stage",
        "run",
        "status",
        "final_knn_acc",
        "n_train",
        "n_val",
        "test_accuracy",
        "val_acc",
    ]
    rows = _rows(text)
    assert list(rows) == [
        ("download", "-"),
        ("split", "-"),
        ("pretrain", "simclr"),
        ("finetune", "simclr-linear-0.1"),
    ]
    assert rows[("pretrain", "simclr")] == ["FAILED", "0.7500", "-", "-", "-", "-"]
    assert rows[("finetune", "simclr-linear-0.1")] == [
        "FINISHED",
        "-",
        "-",
        "-",
        "0.6250",
        "0.7000",
    ]
    assert rows[("download", "-")][2] == "400"
    chosen = compare.table(
        compare.runs_of(client, experiment_id, "e2"),
        metrics=["val_acc", "n_*", "val_acc", "never_logged"],
    )
    assert chosen.splitlines()[0].split() == [
        "stage",
        "run",
        "status",
        "val_acc",
        "n_train",
        "n_val",
        "never_logged",
    ]
    assert _rows(chosen)[("split", "-")] == ["FINISHED", "-", "-", "40", "-"]


def test_two_executions_show_b_minus_a(store):
    client, experiment_id = store
    a, b = (compare.runs_of(client, experiment_id, e) for e in ("e1", "e2"))
    text = compare.table(a, b, metrics=["val_acc", "n_train"])
    assert text.splitlines()[0].split() == [
        "stage",
        "run",
        "status",
        "A",
        "status",
        "B",
        "val_acc",
        "A",
        "val_acc",
        "B",
        "val_acc",
        "B-A",
        "n_train",
        "A",
        "n_train",
        "B",
        "n_train",
        "B-A",
    ]
    rows = _rows(text)
    assert rows[("finetune", "simclr-linear-0.1")] == [
        "FINISHED",
        "FINISHED",
        "0.6000",
        "0.7000",
        "+0.1000",
        "-",
        "-",
        "-",
    ]
    assert rows[("pretrain", "simclr")][:2] == ["FINISHED", "FAILED"]
    assert rows[("download", "-")][-3:] == ["400", "400", "0"]
    assert text == compare.table(list(reversed(a)), list(reversed(b)), ["val_acc", "n_train"])


def test_a_rerun_in_one_execution_shows_the_latest_run(store):
    client, experiment_id = store
    rerun = client.create_run(
        experiment_id,
        start_time=2_000_000,
        tags={"stage": "pretrain", "execution": "e2", "pipeline_id": "p2", "method": "simclr"},
    )
    tracking.TrackedRun(client, rerun.info.run_id).log_metrics({"final_knn_acc": 0.8})
    client.set_terminated(rerun.info.run_id, status="FINISHED")
    text = compare.table(compare.runs_of(client, experiment_id, "e2"), metrics=["final_knn_acc"])
    assert _rows(text)[("pretrain", "simclr")] == ["FINISHED", "0.8000"]
    assert text.endswith("several runs for pretrain simclr: the latest started is shown")


def _widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def _table(text: str, labels: int) -> tuple[list[str], list[str], dict[tuple, list[str]]]:
    """A grouped table's group headers, column headers and rows by their ``labels`` text cells;
    cells are split on two or more spaces (a header such as ``peak MB`` has one)."""
    groups, header, _, *lines = text.splitlines()
    rows = {}
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        rows[tuple(cells[:labels])] = cells[labels:]
    return re.split(r"\s{2,}", groups.strip()), re.split(r"\s{2,}", header.strip()), rows


def _run(runs: list, stage: str, key: str = ""):
    (found,) = [r for r in runs if compare.run_key(r) == (stage, key)]
    return found.data.metrics


def test_the_default_is_the_study_one_row_per_cell_within_120_columns(study):
    _, _, s1, _ = study
    text = compare.study_table(s1)
    assert _widest(text) <= compare.WIDTH
    cells, stages = text.split("\n\n")  # no notes: every run finished, one run per key
    groups, header, rows = _table(cells, labels=3)
    assert groups == ["accuracy", "pretrain", "finetune"]
    assert header == [
        *("init", "mode", "fraction", "validation", "test"),
        *("seconds", "peak MB", "seconds", "peak MB"),
    ]
    assert list(rows) == sorted(CELLS, key=lambda c: (c[0], c[1], float(c[2])))
    pretrain, finetune = (
        _run(s1, "pretrain", "autoencoder"),
        _run(s1, "finetune", "autoencoder-finetune-1.0"),
    )
    assert rows[("autoencoder", "finetune", "1.0")] == [
        "0.5700",  # the stage's mean, not Lightning's per-epoch seed0-val_acc
        "0.5500",  # from the evaluate run
        f"{pretrain['stage_seconds']:.1f}",
        f"{pretrain['peak_rss_mb']:.0f}",
        f"{finetune['stage_seconds']:.1f}",
        f"{finetune['peak_rss_mb']:.0f}",
    ]
    assert "-" not in {v for row in rows.values() for v in row}
    data_only = [r for r in s1 if r.data.tags["stage"] in ("download", "split")]
    assert compare.study_table(data_only).startswith("no study cells: no finetune or evaluate")
    groups, header, rows = _table("\n" + stages, labels=2)
    assert header == ["stage", "run", "seconds", "peak MB"]
    assert list(rows) == [
        (s, "-") for s in ("download", "split", "augment", "evaluate", "visualize")
    ]
    assert rows[("split", "-")] == [
        f"{_run(s1, 'split')['stage_seconds']:.1f}",
        rows[("split", "-")][1],
    ]


def test_two_executions_show_b_minus_a_on_the_same_rows(study):
    _, _, s1, s2 = study
    text = compare.study_table(s1, s2)
    assert _widest(text) <= compare.WIDTH
    cells, stages, notes = text.split("\n\n")
    groups, header, rows = _table(cells, labels=3)
    assert groups == ["validation accuracy", "test accuracy", "pretrain B-A", "finetune B-A"]
    assert header == [
        *("init", "mode", "fraction", "A", "B", "B-A", "A", "B", "B-A"),
        *("seconds", "peak MB", "seconds", "peak MB"),
    ]
    assert list(rows) == sorted(CELLS, key=lambda c: (c[0], c[1], float(c[2])))
    row = rows[("scratch", "linear", "0.01")]
    assert row[:6] == ["0.5000", "0.5500", "+0.0500", "0.4800", "0.5300", "+0.0500"]
    a, b = _run(s1, "pretrain", "scratch"), _run(s2, "pretrain", "scratch")
    assert float(row[6]) == pytest.approx(b["stage_seconds"] - a["stage_seconds"], abs=0.051)
    a, b = (_run(s, "finetune", "scratch-linear-0.01") for s in (s1, s2))
    assert float(row[8]) == pytest.approx(b["stage_seconds"] - a["stage_seconds"], abs=0.051)
    groups, header, rows = _table(stages, labels=2)
    assert groups == ["seconds", "peak MB"]
    assert header == ["stage", "run", "A", "B", "B-A", "A", "B", "B-A"]
    visualize = rows[("visualize", "-")]  # failed in s2 before it logged its cost
    assert visualize[1:3] == ["-", "-"] and visualize[4:] == ["-", "-"]
    assert notes.splitlines() == ["B: not finished: visualize FAILED", compare.MISSING_NOTE]


def test_gpu_memory_is_the_highest_sample_where_mlflow_sampled_a_gpu(study):
    client, experiment_id, _, _ = study
    (run,) = [
        r
        for r in compare.runs_of(client, experiment_id, "s1")
        if compare.run_key(r) == ("finetune", "pixels-knn-1.0")
    ]
    for step, used in enumerate((100.0, 900.0, 300.0)):  # as MLflow's sampler logs them
        client.log_metric(run.info.run_id, "system/gpu_0_memory_usage_megabytes", used, step=step)

    def history(run_id: str, name: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run_id, name)]

    text = compare.study_table(compare.runs_of(client, experiment_id, "s1"), history=history)
    assert _widest(text) <= compare.WIDTH
    _, header, rows = _table(text.split("\n\n")[0], labels=3)
    assert header.count("GPU MB") == 2 and header[-1] == "GPU MB"
    assert rows[("pixels", "knn", "1.0")][-1] == "900"
    assert rows[("pixels", "knn", "0.01")][-1] == "-"


def test_main_shows_the_study_and_system_metrics_only_on_request(study, workdir, capsys):
    def main(*argv: str) -> list[str]:
        assert compare.main(_parse(compare.add_arguments, [*argv, "--experiment", STUDY])) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(len(line) for line in lines) <= compare.WIDTH
        return lines

    lines = main()
    assert lines[0] == f"execution s2 ({len(_study_runs(0))} runs) in experiment {STUDY}"
    assert lines[3].split()[:3] == ["init", "mode", "fraction"]
    assert lines[5 + len(CELLS)] == "" and not any("system/" in line for line in lines)
    everything = "\n".join(main("--metric", "*"))
    assert "test_accuracy.pixels-knn-1.0" in everything and "system/" not in everything
    system = "\n".join(main("--system"))
    assert "system/cpu_utilization_percentage" in system and "val_acc" not in system
    assert "system/cpu_utilization_percentage" in "\n".join(main("--system", "--metric", "*"))


def test_main_prints_the_latest_by_default_and_a_pair_on_request(store, workdir, capsys):
    write_params(workdir, params_for())  # the experiment name comes from params.yaml
    assert compare.main(_parse(compare.add_arguments, [])) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"execution e2 (4 runs) in experiment {EXPERIMENT}\n")
    assert "0.7000" in out and "0.6000" not in out
    args = _parse(
        compare.add_arguments, ["e1", "p2", "--metric", "val_acc", "--experiment", EXPERIMENT]
    )
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [
        f"A: execution e1 (4 runs) in experiment {EXPERIMENT}",
        f"B: execution p2 (4 runs) in experiment {EXPERIMENT}",
    ]
    assert "+0.1000" in out


def test_unknown_executions_and_empty_stores_are_one_line_errors(store, workdir):
    message = (
        "no MLflow runs for execution nope in experiment label-efficiency; run `make run` "
        "first or pass an execution id (tag `execution`) or pipeline_id"
    )
    args = _parse(compare.add_arguments, ["nope", "--experiment", EXPERIMENT])
    with pytest.raises(PipelineError) as raised:
        compare.main(args)
    assert str(raised.value) == message
    with pytest.raises(
        PipelineError, match="no MLflow runs for execution \\(latest\\) in experiment elsewhere"
    ):
        compare.main(_parse(compare.add_arguments, ["--experiment", "elsewhere"]))
    with pytest.raises(PipelineError, match="at most two executions"):
        compare.main(_parse(compare.add_arguments, ["e1", "e2", "e1", "--experiment", "x"]))


def test_compare_never_creates_a_store(workdir: Path):
    with pytest.raises(PipelineError, match="no MLflow store at .*mlflow.db; run `make run`"):
        compare.main(_parse(compare.add_arguments, ["--experiment", EXPERIMENT]))
    assert list(workdir.iterdir()) == []


def test_the_parsers_need_neither_torch_nor_mlflow():
    """--help stays instant: torch and mlflow are imported only when the command runs."""
    code = (
        "import sys, argparse; from pipeline import compare, predict; "
        "p = argparse.ArgumentParser(); predict.add_arguments(p); compare.add_arguments(p); "
        "assert 'torch' not in sys.modules and 'mlflow' not in sys.modules"
    )
    run(["python", "-c", code], REPO)
