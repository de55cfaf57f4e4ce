"""Fine-tuning: one cell of the matrix end to end; the test split is never touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import from_dict
from pipeline.errors import MissingInputError
from pipeline.models import classifier
from pipeline.stages import augment, download, finetune, pretrain, split
from tests.conftest import params_for, sync_matrix


def tiny_params(tiny_idx: Path, **finetune_overrides) -> dict:
    params = params_for("idx", split={"label_fractions": [0.25, 1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(backbone="lenet5", width=8)
    params["pretrain"].update(methods=["scratch", "rotation", "pca"], epochs=1, batch_size=64)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["finetune"].update(epochs=2, batch_size=32, min_steps_per_epoch=2, seeds=[0, 1])
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
    assert not [p for p in audit.opened if p.endswith(("test.npy", "test_images.npy",
                                                        "test_labels.npy"))]  # fmt: skip
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


def test_evaluate_scores_every_cell_on_the_test_split_and_summarizes(pretrained_tiny: Path,
                                                                    tmp_path: Path):  # fmt: skip
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

    summary = json.loads(Path("metrics/summary.json").read_text())["test_accuracy"]
    assert set(summary) == {"scratch-linear", "scratch-knn", "rotation-linear", "rotation-knn"}
    for cells in summary.values():
        assert set(cells) == {"0.25", "1.0"}
        for cell in cells.values():
            assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"] and cell["n_seeds"] == 2
    per_cell = json.loads(Path("metrics/eval/rotation-knn-1.0.json").read_text())["seeds"]
    for scores in per_cell.values():
        for metric, (low, high) in scores["ci95"].items():
            assert low <= scores["metrics"][metric] <= high, metric
        assert len(scores["confusion_matrix"]) == 4
    table = Path("metrics/summary.md").read_text()
    assert "| rotation | knn |" in table
    assert Path("reports/figures/label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert Path("metrics/label_efficiency.csv").read_text().startswith("fraction,model,accuracy")
    assert set(result["best_by_validation"]) == {"0.25", "1.0"}

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("label-efficiency")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert run.data.tags["best.1.0"].split(" ")[0] in {c for c in summary}
    logged = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert set(logged) >= {"best-0_25", "best-1_0"}
    # The logged model is the pipeline's own folder of plain state_dicts, loadable weights-only.
    folder = mlflow.artifacts.download_artifacts(logged["best-1_0"].artifact_location,
                                                 dst_path=str(tmp_path / "best"))  # fmt: skip
    model, description = classifier.load(Path(folder))
    assert f"{description['init']}-{description['mode']}" == logged["best-1_0"].tags["cell"]
    assert not list(Path(folder).rglob("*.pkl")) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_the_multitask_term_trains_the_shared_encoder(pretrained_tiny: Path):
    from pipeline.models.classifier import LinearClassifier
    from pipeline.models.encoders import load_encoder
    from pipeline.stages.finetune import _multitask_module

    config = from_dict(tiny_params(pretrained_tiny, seeds=[0], multitask_weight=0.5))
    encoder, description = load_encoder("rotation")
    classifier_ = LinearClassifier(encoder, description["feature_dim"], 4)

    class Data:
        num_classes = 4

    document = json.loads(Path("data/augment/idx/policy.json").read_text())
    ssl = _multitask_module(config, "rotation", document, classifier_, Data())
    assert ssl.backbone is classifier_.encoder and ssl.method == "rotation"
    summary = finetune.run(config, init="rotation", mode="finetune", fraction="1.0")
    assert 0.0 <= summary["val_acc_mean"] <= 1.0
