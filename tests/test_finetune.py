"""Fine-tuning: one cell of the matrix end to end; the test split is never touched."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from pipeline.config import from_dict
from pipeline.documents import PolicyDocument
from pipeline.errors import MissingInputError
from pipeline.evaluation import METRICS
from pipeline.models import classifier
from pipeline.predict import probabilities_of
from pipeline.stages import augment, download, finetune, pretrain, split
from tests.conftest import params_for, run_env, sync_matrix


def tiny_params(tiny_idx: Path, **finetune_overrides) -> dict:
    params = params_for("idx", split={"label_fractions": [0.25, 1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone="lenet5", width=8)
    params["pretrain"].update(methods=["scratch", "rotation", "pca"], epochs=1, batch_size=64)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(
        max_passes=1, min_steps=4, batch_size=32, min_steps_per_epoch=2, seeds=[0, 1]
    )
    params["finetune"].update(finetune_overrides)
    params["finetune"]["knn"] = {"ks": [1, 5], "temperatures": [0.1]}
    return sync_matrix(params)


@pytest.fixture
def pretrained_tiny(workdir: Path, tiny_idx: Path) -> Path:
    config = from_dict(tiny_params(tiny_idx))
    download.run(config)
    split.run(config)
    augment.run(config)
    for method in ("scratch", "rotation", "pca"):
        pretrain.run(config, method=method)
    return tiny_idx


class TestSplitNeverOpened:
    """Records every file the process opens (an audit hook) to prove what a stage reads."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        sys.addaudithook(self.hook)
        self.active = True

    def hook(self, event: str, args: tuple) -> None:
        if self.active and event == "open" and isinstance(args[0], str | Path):
            self.opened.append(str(args[0]))


@pytest.mark.parametrize("mode", ["linear", "finetune", "knn"])
def test_one_cell_trains_per_seed_without_opening_the_test_split(pretrained_tiny: Path, mode: str):
    config = from_dict(tiny_params(pretrained_tiny))
    audit = TestSplitNeverOpened()
    try:
        summary = finetune.run(config, init="rotation", mode=mode, fraction="0.25")
    finally:
        audit.active = False
    assert not [
        p for p in audit.opened if p.endswith(("test.npy", "test_images.npy", "test_labels.npy"))
    ]
    assert any(p.endswith("labeled-0.25.npy") for p in audit.opened)  # the hook does see reads
    assert set(summary["seeds"]) == {"0", "1"}
    assert 0.0 <= summary["val_acc_mean"] <= 1.0
    model, description = classifier.load(Path(f"models/finetune/rotation-{mode}-0.25"), seed=1)
    images = torch.zeros(3, 1, 8, 8)
    probabilities = model(images)
    assert probabilities.shape == (3, 4)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    saved = json.loads(Path(f"metrics/finetune/rotation-{mode}-0.25.json").read_text())
    assert saved["val_acc_mean"] == summary["val_acc_mean"]
    if mode == "knn":
        assert saved["seeds"]["0"]["k"] in (1, 5)


def test_scratch_and_pca_cells(pretrained_tiny: Path):
    config = from_dict(tiny_params(pretrained_tiny, seeds=[0]))
    finetune.run(config, init="scratch", mode="finetune", fraction="1")
    for mode in ("linear", "finetune"):
        finetune.run(config, init="pca", mode=mode, fraction="1")
    linear, description = classifier.load(Path("models/finetune/pca-linear-1.0"))
    tuned, _ = classifier.load(Path("models/finetune/pca-finetune-1.0"))
    assert description["encoder"]["kind"] == "pca"
    assert linear(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    pca = torch.load("models/pretrain/pca/encoder.pt", weights_only=True)["components"]
    assert torch.equal(linear.encoder.components, pca)  # frozen by the linear probe
    assert not torch.equal(tuned.encoder.components, pca)  # adapted by fine-tuning


def test_cells_outside_the_study_are_refused_with_what_is_allowed(pretrained_tiny: Path):
    config = from_dict(tiny_params(pretrained_tiny))
    allowed = "allowed: 0.25, 1.0"
    with pytest.raises(MissingInputError, match=f"0.5.*not in finetune.fractions; {allowed}"):
        finetune.run(config, init="rotation", mode="linear", fraction="0.5")
    with pytest.raises(MissingInputError, match="'simclr' is not in finetune.inits"):
        finetune.run(config, init="simclr", mode="linear", fraction="1")
    with pytest.raises(MissingInputError, match="'svm' is not in finetune.modes"):
        finetune.run(config, init="pca", mode="svm", fraction="1")


def test_a_model_folder_that_is_not_ours_is_named(tmp_path: Path):
    with pytest.raises(MissingInputError, match=f"{tmp_path} is not a classifier of this pipeline"):
        classifier.load(tmp_path)


def test_evaluate_scores_every_cell_on_the_test_split_and_summarizes(
    pretrained_tiny: Path, tmp_path: Path
):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.stages import evaluate
    from pipeline.tracking import tracking_uri

    params = tiny_params(pretrained_tiny)
    params["finetune"].update(inits=["scratch", "rotation"], modes=["linear", "knn"])
    params["evaluate"]["bootstrap"] = 100
    config = from_dict(params)
    for init, mode, fraction in config.finetune.cells():
        finetune.run(config, init=init, mode=mode, fraction=str(fraction))
    audit = TestSplitNeverOpened()
    try:
        result = evaluate.run(config)
    finally:
        audit.active = False
    assert any(p.endswith("test.npy") for p in audit.opened)  # evaluate is the one that reads it

    document = json.loads(Path("metrics/summary.json").read_text())
    summary = document["test_accuracy"]  # the keys dvc exp show and the README name
    answer = document.pop("answer")  # the study's answer: rotation against scratch, paired
    assert set(answer) == {"0_25", "1_0"} and answer == result["answer"]
    for entry in answer.values():
        assert entry["ssl_cell"].split("-")[0] == "rotation"
        assert entry["baseline_cell"].split("-")[0] == "scratch"
        assert entry["ci_low"] <= entry["difference"] <= entry["ci_high"]
        gap = entry["ssl_accuracy"] - entry["baseline_accuracy"]
        assert entry["difference"] == pytest.approx(gap, abs=2e-6)
    assert set(document) == {f"test_{name}" for name in METRICS}  # every metric, its interval
    for models in document.values():
        assert set(models) == {"scratch-linear", "scratch-knn", "rotation-linear", "rotation-knn"}
        for cells in models.values():
            assert set(cells) == {"0_25", "1_0"}  # no dots: flattened names stay unambiguous
            for cell in cells.values():
                assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"] and cell["n_seeds"] == 2
    per_cell = json.loads(Path("metrics/eval/rotation-knn-1.0.json").read_text())["seeds"]
    for scores in per_cell.values():
        for metric, (low, high) in scores["ci95"].items():
            assert low <= scores["metrics"][metric] <= high, metric
        assert len(scores["confusion_matrix"]) == 4
    table = Path("metrics/summary.md").read_text()
    assert "| rotation | knn |" in table
    assert table.splitlines()[-1].startswith("Answer: ") and "paired 95 %" in table
    assert [line.split(" (")[0] for line in table.splitlines() if line.startswith("Test ")] == [
        f"Test {m.title}" for m in METRICS.values()
    ]
    assert Path("reports/figures/label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    curve = Path("metrics/label_efficiency.csv").read_text().splitlines()
    assert curve[0].startswith("fraction,model,accuracy,ci_low,ci_high,")  # DVC's plot: y accuracy
    assert "nll,nll_ci_low,nll_ci_high" in curve[0]
    assert len(curve) == 1 + 8 and all(len(r.split(",")) == 2 + 3 * len(METRICS) for r in curve)
    header = Path("metrics/summary.csv").read_text().splitlines()[0]
    assert header.startswith("init,mode,fraction,n_seeds,mean,std,ci_low,ci_high,error_mean,")
    assert set(result["best_by_validation"]) == {"0.25", "1.0"}

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("label-efficiency")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    for name in METRICS:  # every metric's mean per cell, in MLflow too
        value = run.data.metrics[f"test_{name}.rotation-knn-1.0"]
        assert value == pytest.approx(document[f"test_{name}"]["rotation-knn"]["1_0"]["mean"])
    assert run.data.tags["best.1.0"].split(" ")[0] in {c for c in summary}
    logged = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert set(logged) >= {"best-0_25", "best-1_0"}
    # The logged model is code (pipeline/serving.py) and the pipeline's own folder of plain
    # state_dicts: nothing pickled.
    folder = mlflow.artifacts.download_artifacts(
        logged["best-1_0"].artifact_location, dst_path=str(tmp_path / "best")
    )
    assert not [p for p in Path(folder).rglob("*") if p.suffix in (".pkl", ".pickle")]
    (weights,) = Path(folder).rglob("model.json")
    model, description = classifier.load(weights.parent)
    assert f"{description['init']}-{description['mode']}" == logged["best-1_0"].tags["cell"]

    # The best classifier of each label fraction is in the Model Registry under a stable name,
    # its newest version under the alias "current".
    for fraction in ("0_25", "1_0"):
        version = client.get_model_version_by_alias(f"idx-best-{fraction}", "current")
        assert version.tags["cell"] == logged[f"best-{fraction}"].tags["cell"]

    # The model's signature is its contract: N x H x W x C uint8, enforced by MLflow in a
    # Python call (a float image is refused, not cast).
    served_uri = "models:/idx-best-1_0@current"
    (images,) = mlflow.models.get_model_info(served_uri).signature.inputs.inputs
    assert (images.type, images.shape) == (np.dtype(np.uint8), (-1, 8, 8, 1))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    pixels[0, 0, :2, 0] = 0, 255  # so that pixels / 255 spans [0, 1] exactly
    with pytest.raises(mlflow.MlflowException, match="float64 does not match expected dtype uint8"):
        mlflow.pyfunc.load_model(served_uri).predict(pixels / 255)

    # mlflow models serve answers a prediction on 127.0.0.1, as `pipeline predict` computes it,
    # and refuses every request that breaks the contract with a 400 naming what it expected.
    expected = probabilities_of(model, description, pixels).numpy()
    with mlflow_serve(served_uri, tracking_uri()) as url:
        answer = requests.post(f"{url}/invocations", json={"inputs": pixels.tolist()}, timeout=60)
        refusals = served_refusals(url, pixels)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["class"] for p in predictions] == [
        description["classes"][i] for i in expected.argmax(axis=1)
    ]
    for row, probabilities in zip(predictions, expected, strict=True):
        served = [row[f"p_{c}"] for c in description["classes"]]
        assert served == pytest.approx(probabilities.tolist(), abs=1e-6)
    assert refusals == EXPECTED_REFUSALS


#: What a served 8 x 8 x 1 classifier answers to each request of :func:`served_refusals`.
CONTRACT = "expected uint8 images of shape N x 8 x 8 x 1 (integer pixel values 0..255)"
EXPECTED_REFUSALS = {
    # What most clients send, which MLflow alone casts to all zeros and answers with 200.
    "float in [0, 1]": (
        400,
        f"{CONTRACT}, got float64 3 x 8 x 8 x 1 with values in [0, 1]: "
        "scale [0, 1] images to round(255 * x)",
    ),
    "float in 0..255": (
        400,
        f"{CONTRACT}, got float64 3 x 8 x 8 x 1 with values in [0, 255]: send whole numbers 0..255",
    ),
    "wrong size": (400, f"{CONTRACT}, got int64 2 x 32 x 32 x 1"),
    "wrong channel count": (400, f"{CONTRACT}, got int64 2 x 8 x 8 x 3"),
    "wrong dtype": (400, f"{CONTRACT}, got strings 1 x 8 x 8 x 1"),
    "out of range": (400, f"{CONTRACT}, got int64 3 x 8 x 8 x 1 with values in [-1, 254]"),
    "one image unwrapped": (400, f"{CONTRACT}, got int64 8 x 8 x 1: wrap one image in a list"),
    "a DataFrame": (
        400,
        "the request body has the keys ['dataframe_split']: "
        f'send {{"inputs": [...]}} as application/json; {CONTRACT}',
    ),
}


def served_refusals(url: str, pixels: np.ndarray) -> dict[str, tuple[int, str]]:
    """Status and message of the served model's answer to each request that breaks its
    contract, built from ``pixels`` (3 x 8 x 8 x 1 uint8 spanning 0..255)."""
    rng = np.random.default_rng(1)
    bad = {
        "float in [0, 1]": {"inputs": (pixels / 255).tolist()},
        "float in 0..255": {"inputs": pixels.astype(float).tolist()},
        "wrong size": {"inputs": rng.integers(0, 256, (2, 32, 32, 1)).tolist()},
        "wrong channel count": {"inputs": rng.integers(0, 256, (2, 8, 8, 3)).tolist()},
        "wrong dtype": {"inputs": np.full((1, 8, 8, 1), "7").tolist()},
        "out of range": {"inputs": (pixels.astype(int) - 1).tolist()},
        "one image unwrapped": {"inputs": pixels[0].tolist()},
        "a DataFrame": {"dataframe_split": {"columns": ["x"], "data": [[1]]}},
    }
    refusals = {}
    for name, body in bad.items():
        answer = requests.post(f"{url}/invocations", json=body, timeout=60)
        refusals[name] = (answer.status_code, answer.json()["message"])
    return refusals


def test_the_request_check_leaves_other_models_to_mlflow():
    from mlflow.types import ColSpec, Schema, TensorSpec

    from pipeline.serving import ImageContract, signature

    description = {"image_size": 28, "in_channels": 3, "classes": ["a", "b"]}
    assert ImageContract.of_schema(signature(description).inputs) == ImageContract(28, 28, 3)
    for other in (
        None,
        Schema([ColSpec("double", "x")]),
        Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 3))]),
        Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28, 3), "images")]),
        Schema([TensorSpec(np.dtype(np.uint8), (-1, 784))]),
    ):
        assert ImageContract.of_schema(other) is None


@contextlib.contextmanager
def mlflow_serve(model_uri: str, store: str) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on a free port of 127.0.0.1, in this
    environment; yields its URL once it answers /ping, and stops it (its whole process group)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command,
        env=run_env() | {"MLFLOW_TRACKING_URI": store},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "mlflow models serve did not answer in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_multitask_term_trains_the_shared_encoder(pretrained_tiny: Path):
    from pipeline.models.classifier import LinearClassifier
    from pipeline.models.encoders import load_encoder
    from pipeline.stages.finetune import _multitask_module

    config = from_dict(tiny_params(pretrained_tiny, seeds=[0], multitask_weight=0.5))
    encoder, description = load_encoder("rotation")
    classifier_ = LinearClassifier(encoder, description.feature_dim, 4)

    class Data:
        num_classes = 4

    document = PolicyDocument.read("idx")
    ssl = _multitask_module(config, "rotation", document, classifier_, Data())
    assert ssl.backbone is classifier_.encoder and ssl.method == "rotation"
    summary = finetune.run(config, init="rotation", mode="finetune", fraction="1.0")
    assert 0.0 <= summary["val_acc_mean"] <= 1.0


def test_the_budget_grows_with_the_subset_and_has_a_floor_in_steps():
    from pipeline.models.finetune import budget

    # Fashion-MNIST's 1 %, 10 % and 100 % subsets at batch 128, 50 steps per epoch at least.
    small = budget(540, 128, steps_per_epoch=50, max_passes=20, min_steps=600)
    tenth = budget(5400, 128, steps_per_epoch=50, max_passes=20, min_steps=600)
    full = budget(54000, 128, steps_per_epoch=421, max_passes=20, min_steps=600)
    assert (small.pass_steps, small.cap_steps, small.max_epochs) == (4, 600, 12)  # the floor
    # 20 passes of 42 steps: 840 steps, in whole epochs of 50 steps.
    assert (tenth.pass_steps, tenth.max_epochs, tenth.cap_steps) == (42, 17, 850)
    assert (full.cap_steps, full.max_epochs) == (20 * 421, 20)  # 20 passes
    assert small.cap_steps < tenth.cap_steps < full.cap_steps
    with pytest.raises(ValueError, match="max_passes=0"):
        budget(540, 128, 50, max_passes=0, min_steps=600)


def test_why_a_seed_stopped_is_early_stopping_or_the_cap():
    from pipeline.models.finetune import stop_reason

    history = [{"epoch": float(e)} for e in range(1, 6)]
    assert stop_reason(history, best_epoch=2, max_epochs=10) == {
        "stopped": "early_stopping",
        "improving_at_cap": False,
    }
    assert stop_reason(history, best_epoch=5, max_epochs=5) == {
        "stopped": "cap",
        "improving_at_cap": True,
    }
    assert stop_reason(history, best_epoch=3, max_epochs=5)["improving_at_cap"] is False


def test_each_cell_records_its_budget_and_why_each_seed_stopped(pretrained_tiny: Path):
    config = from_dict(tiny_params(pretrained_tiny, max_passes=3, min_steps=1, patience=1))
    finetune.run(config, init="rotation", mode="finetune", fraction="1.0")
    cell = json.loads(Path("metrics/finetune/rotation-finetune-1.0.json").read_text())
    budget = cell["budget"]
    assert budget["max_epochs"] == 3 and budget["cap_steps"] == 3 * budget["steps_per_epoch"]
    for seed in cell["seeds"].values():
        assert seed["stopped"] in ("early_stopping", "cap")
        assert (seed["stopped"] == "cap") == (seed["epochs_run"] == 3)
        assert seed["improving_at_cap"] == (
            seed["stopped"] == "cap" and seed["best_epoch"] == seed["epochs_run"]
        )
        assert len(seed["history"]) == seed["epochs_run"] >= 1


def test_the_budget_keys_and_the_pixels_baseline_refuse_bad_input(tiny_idx: Path):
    from pipeline.config import ConfigError

    for key, value, message in (
        ("max_passes", 0, "finetune.max_passes = 0 is not allowed"),
        ("min_steps", -1, "finetune.min_steps = -1 is not allowed"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(tiny_params(tiny_idx, **{key: value}))
    params = tiny_params(tiny_idx)
    params["pretrain"]["methods"].append("pixels")
    params["finetune"]["inits"].append("pixels")
    with pytest.raises(ConfigError, match="finetune.inits has 'pixels', which has no weights"):
        from_dict(params)
    params["pretrain"]["methods"].append("dino")
    with pytest.raises(ConfigError, match='pretrain.methods.4 = "dino" is not allowed'):
        from_dict(params)


def test_raw_pixels_are_a_baseline_in_the_frozen_modes_only(pretrained_tiny: Path):
    params = tiny_params(pretrained_tiny, min_steps=200)  # a linear head needs some steps
    params["pretrain"]["methods"].append("pixels")
    params = sync_matrix(params)
    config = from_dict(params)
    assert ("pixels", "finetune", 1.0) not in config.finetune.cells()
    assert ("pixels", "knn", 1.0) in config.finetune.cells()
    pretrain.run(config, method="pixels")
    monitor = json.loads(Path("metrics/pretrain/pixels.json").read_text())
    assert 0.0 < monitor["val_knn_acc"] <= 1.0
    summary = finetune.run(config, init="pixels", mode="knn", fraction="1.0")
    linear = finetune.run(config, init="pixels", mode="linear", fraction="1.0")
    assert summary["val_acc_mean"] > 0.5 and linear["val_acc_mean"] > 0.5  # chance is 0.25
    model, description = classifier.load(Path("models/finetune/pixels-knn-1.0"))
    assert description["encoder"]["kind"] == "pixels"
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    files = json.loads(Path("models/finetune/pixels-knn-1.0/model.json").read_text())["files"]
    assert files == {"0": "seed0.pt", "1": "seed0.pt"}  # kNN: both seeds are one bank
    with pytest.raises(MissingInputError, match="--mode finetune is not allowed"):
        finetune.run(config, init="pixels", mode="finetune", fraction="1.0")


def test_standardized_features_fold_back_into_a_head_on_raw_features():
    from pipeline.stages.finetune import fold_standardization, standardized

    generator = torch.Generator().manual_seed(0)
    raw = {
        "labeled-1.0": torch.rand(50, 6, generator=generator) * 40 + 3,
        "val": torch.rand(20, 6, generator=generator) * 40,
    }
    raw["labeled-1.0"][:, 0] *= 10  # one dimension far wider than the others: it stays so
    scaled, mean, std = standardized(raw, "labeled-1.0")
    train = scaled["labeled-1.0"]
    torch.testing.assert_close(train.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.var(0).mean(), torch.tensor(1.0))  # one scale for all
    assert train[:, 0].std() > 5 * train[:, 1].std()  # the geometry is kept
    head = torch.nn.Linear(6, 3)
    state = {"head.weight": head.weight.detach(), "head.bias": head.bias.detach()}
    folded = fold_standardization(state, mean, std)
    expected = head(scaled["val"]).detach()
    torch.testing.assert_close(
        raw["val"] @ folded["head.weight"].T + folded["head.bias"], expected, atol=1e-4, rtol=1e-4
    )
