"""``predict`` classifies image files like the training data; ``compare`` tabulates MLflow runs.

Everything runs in the ``workdir`` tmp folder: a tiny classifier made here (no training), and
runs written straight into the folder's own SQLite MLflow store.
"""

from __future__ import annotations

import argparse
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

#: (execution, pipeline_id, stage, extra tags, metrics, status); e2 improves on e1.
RUNS = [
    ("e1", "p1", "download", {}, {"n_train": 400}, "FINISHED"),
    ("e1", "p1", "split", {}, {"n_val": 40}, "FINISHED"),
    ("e1", "p1", "pretrain", {"method": "simclr"}, {"final_knn_acc": 0.5}, "FINISHED"),
    (
        "e1",
        "p1",
        "finetune",
        {"init": "simclr", "mode": "linear", "fraction": "0.1"},
        {"val_acc": 0.6, "test_accuracy": 0.55},
        "FINISHED",
    ),
    (
        "e2",
        "p2",
        "finetune",
        {"init": "simclr", "mode": "linear", "fraction": "0.1"},
        {"val_acc": 0.7, "test_accuracy": 0.625},
        "FINISHED",
    ),
    ("e2", "p2", "pretrain", {"method": "simclr"}, {"final_knn_acc": 0.75}, "FAILED"),
    ("e2", "p2", "split", {}, {"n_val": 40}, "FINISHED"),
    ("e2", "p2", "download", {}, {"n_train": 400}, "FINISHED"),
]


@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlflow.db holding two executions, e2 started after e1 (its runs in another order).

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
    return folder / tracking.DEFAULT_DB


@pytest.fixture
def store(workdir: Path, template_store: Path):
    """The two executions in the workdir's own MLflow store (a copy of the template)."""
    shutil.copyfile(template_store, workdir / tracking.DEFAULT_DB)
    client = tracking.client()
    return client, client.get_experiment_by_name(EXPERIMENT).experiment_id


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
