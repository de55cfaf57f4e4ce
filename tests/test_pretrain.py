"""Self-supervised pretraining: each method learns, resumes exactly, writes loadable encoders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from pipeline.config import from_dict
from pipeline.errors import MissingInputError
from pipeline.models.pretrain import METHODS, PCAEncoder, PretrainModule
from pipeline.stages import augment, download, pretrain, split
from tests.conftest import params_for, sync_matrix

SMALL_MODEL = {"backbone": "lenet5", "width": 8}
FAST = {"epochs": 2, "batch_size": 64, "warmup_epochs": 0}


def strict_json(path: Path) -> dict:
    """Parse JSON as other tools will: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def tiny_params(tiny_idx: Path, **pretrain_overrides) -> dict:
    params = params_for("idx", split={"label_fractions": [0.5, 1.0]})
    params["data"]["local_path"] = str(tiny_idx)
    params["model"].update(SMALL_MODEL)
    # Every method (the default params.yaml runs only three of them).
    params["pretrain"]["methods"] = [
        "scratch",
        "pca",
        "simclr",
        "autoencoder",
        "rotation",
        "inpainting",
        "vae",
    ]
    params["pretrain"].update(FAST, **pretrain_overrides)
    params["pretrain"]["monitor"]["knn_max_train"] = 200
    params["pretrain"]["inpainting"]["mask_size"] = 3
    return sync_matrix(params)


@pytest.fixture
def prepared_tiny(workdir: Path, tiny_idx: Path) -> Path:
    config = from_dict(tiny_params(tiny_idx))
    download.run(config)
    split.run(config)
    augment.run(config)
    return tiny_idx


def _module(method: str, options: dict, channels: int = 1, size: int = 16) -> PretrainModule:
    policy = {"random_resized_crop": {"p": 1.0, "scale": [0.5, 1.0]}, "hflip": {"p": 0.5}}
    return PretrainModule(
        method=method,
        backbone={"name": "lenet5", "width": 8},
        in_channels=channels,
        image_size=size,
        num_classes=4,
        policy=policy,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        options=options,
        optimizer={
            "name": "adam",
            "lr": 3e-3,
            "weight_decay": 0.0,
            "momentum": 0.9,
            "nesterov": False,
        },
        epochs=1,
        warmup_epochs=0,
        steps_per_epoch=1,
        seed=0,
        monitor={"knn_ks": [5], "knn_temperatures": [0.1], "knn_max_train": 100, "probe_lr": 0.01},
    )


METHOD_OPTIONS = {
    "simclr": {
        "temperature": 0.5,
        "projection_dim": 16,
        "projection_hidden": 32,
        "normalization": "simclr",
    },
    "byol": {
        "projection_dim": 16,
        "projection_hidden": 32,
        "momentum_base": 0.99,
        "momentum_final": 1.0,
    },
    "autoencoder": {"loss": "mse", "noise_std": 0.1},
    "rotation": {},
    "inpainting": {"mask_size": 5},
    "vae": {"latent_dim": 4, "beta": 1.0},
    "gan": {
        "latent_dim": 8,
        "generator_loss": "non_saturating",
        "collapse_ratio": 0.3,
        "discriminator": {"lr": 1e-3, "beta1": 0.5, "beta2": 0.999},
        "generator": {"lr": 1e-3, "beta1": 0.5, "beta2": 0.999},
    },
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_loss_on_a_fixed_batch(method: str):
    torch.manual_seed(0)
    module = _module(method, METHOD_OPTIONS[method])
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    images[:, :, 4:12, 4:12] = 255  # structure worth learning: a bright square
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)  # the same views every step
        return module.objective(images, generator)[0]

    before = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * before


def test_pca_recovers_the_top_principal_direction():
    generator = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(10, generator=generator), dim=0)
    data = torch.randn(2000, 1, generator=generator) * 5 * direction + 0.1 * torch.randn(
        2000, 10, generator=generator
    )
    encoder = PCAEncoder(10, 2).fit(data)
    assert abs(torch.dot(encoder.components[0], direction)).item() > 0.999
    assert encoder(data).shape == (2000, 2)


def test_the_stage_writes_a_loadable_encoder_curves_and_metrics(prepared_tiny: Path, caplog):
    config = from_dict(tiny_params(prepared_tiny))
    with caplog.at_level("INFO", logger="pipeline.training"):
        metrics = pretrain.run(config, method="simclr")
    # One progress line per epoch: monitors, throughput and the time left.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain ")]
    assert len(lines) == FAST["epochs"], lines
    assert re.match(
        rf"pretrain simclr: epoch 1/{FAST['epochs']}  train_loss [\d.]+  "
        r"val_knn_acc [\d.]+  val_probe_acc [\d.]+  [\d,]+ img/s  \d+ s left$",
        lines[0],
    ), lines[0]
    assert lines[-1].endswith("  0 s left")
    folder = Path("models/pretrain/simclr")
    state = torch.load(folder / "encoder.pt", weights_only=True)
    description = json.loads((folder / "encoder.json").read_text())
    assert description["kind"] == "backbone" and description["feature_dim"] == 120
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    curves = Path("metrics/pretrain/simclr.csv").read_text().splitlines()
    assert curves[0] == "epoch,train_loss,val_knn_acc,val_probe_acc"
    assert len(curves) == 1 + FAST["epochs"]
    saved = strict_json(Path("metrics/pretrain/simclr.json"))
    assert saved["val_knn_acc"] == pytest.approx(metrics["val_knn_acc"], abs=1e-6)
    assert 0.0 <= saved["val_knn_acc"] <= 1.0
    assert "images_seen" not in saved and "pool_images" not in saved  # no pool: as before
    assert not Path("checkpoints").exists() or not any(Path("checkpoints").rglob("*.ckpt"))
    # Per-epoch monitors reach the stage's MLflow run.
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("label-efficiency")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert run.data.tags["method"] == "simclr" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_knn_acc")
    assert len(history) == FAST["epochs"]
    assert run.data.params["pretrain.simclr.temperature"] == str(
        config.pretrain.options["simclr"]["temperature"]
    )


def test_images_of_another_shape_than_the_policy_are_an_error(prepared_tiny: Path):
    policy = Path("data/augment/idx/policy.json")
    document = json.loads(policy.read_text())
    document["image_size"] = [28, 28]
    policy.write_text(json.dumps(document))
    with pytest.raises(MissingInputError, match=r"expects C x H x W = \[1, 28, 28\].*\[1, 8, 8\]"):
        pretrain.run(from_dict(tiny_params(prepared_tiny)), method="simclr")


def test_vae_and_pca_outputs(prepared_tiny: Path):
    config = from_dict(tiny_params(prepared_tiny, epochs=1))
    pretrain.run(config, method="vae")
    samples = np.load("models/pretrain/vae/samples.npy")
    reconstructions = np.load("models/pretrain/vae/reconstructions.npy")
    assert samples.dtype == np.uint8 and samples.shape[1:] == (8, 8, 1)
    assert reconstructions.shape == np.load("models/pretrain/vae/originals.npy").shape
    metrics = pretrain.run(config, method="pca")
    assert 0 < metrics["explained_variance"] <= 1
    saved = strict_json(Path("metrics/pretrain/pca.json"))
    assert saved["val_probe_acc"] is None and 0 <= saved["val_knn_acc"] <= 1
    description = json.loads(Path("models/pretrain/pca/encoder.json").read_text())
    assert description["kind"] == "pca" and description["feature_dim"] == 64


def test_the_stage_writes_samples_monitors_and_a_weights_only_encoder(prepared_tiny: Path):
    from pipeline.models.encoders import load_encoder

    params = tiny_params(prepared_tiny, epochs=2, max_images=128)
    params["pretrain"]["methods"].append("gan")
    params["pretrain"]["gan"].update(latent_dim=8)
    metrics = pretrain.run(from_dict(params), method="gan")
    folder = Path("models/pretrain/gan")
    samples = np.load(folder / "samples.npy")
    by_epoch = np.load(folder / "samples_by_epoch.npy")
    assert samples.dtype == np.uint8 and samples.shape == (64, 8, 8, 1)
    assert by_epoch.shape == (2 * 8, 8, 8, 1)
    curve = Path("metrics/pretrain/gan.csv").read_text().splitlines()
    assert curve[0] == (
        "epoch,train_loss,val_knn_acc,val_probe_acc,d_loss,g_loss,d_real,d_fake,sample_diversity"
    )
    assert len(curve) == 3
    assert 0 < metrics["d_real"] < 1 and 0 < metrics["d_fake"] < 1
    assert metrics["train_loss"] == pytest.approx(metrics["d_loss"], rel=1e-5)
    torch.load(folder / "encoder.pt", weights_only=True)
    encoder, description = load_encoder("gan")
    assert description.method == "gan" and description.kind == "backbone"
    assert encoder(torch.zeros(2, 1, 8, 8)).shape == (2, description.feature_dim)
    assert json.loads((folder / "encoder.json").read_text())["method"] == "gan"


class StopAtEpoch(L.Callback):
    """Simulates an interruption: fails when the given epoch starts (after earlier checkpoints)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


# The GAN steps two optimizers itself (manual optimization) and keeps pictures per epoch: its
# optimizer states, RNG streams and pictures must all come back from the checkpoint too.
@pytest.mark.parametrize("method", ["rotation", "gan"])
def test_an_interrupted_run_resumes_and_ends_with_the_same_weights(
    prepared_tiny: Path, method: str
):
    params = tiny_params(prepared_tiny, epochs=3, max_images=128)
    params["pretrain"]["methods"].append("gan")
    config = from_dict(params)
    pretrain.run(config, method=method)
    folder = Path(f"models/pretrain/{method}")
    uninterrupted = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".npy"}
    weights = torch.load(folder / "encoder.pt", weights_only=True)
    curves = Path(f"metrics/pretrain/{method}.csv").read_text()

    with pytest.raises(RuntimeError, match="interrupted"):
        pretrain.run(config, method=method, callbacks=(StopAtEpoch(2),))
    checkpoints = list(Path("checkpoints/pretrain").glob(f"{method}-*/last.ckpt"))
    assert len(checkpoints) == 1
    pretrain.run(config, method=method)  # resumes at epoch 3 of 3
    resumed = torch.load(folder / "encoder.pt", weights_only=True)
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert Path(f"metrics/pretrain/{method}.csv").read_text() == curves
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".npy"} == (
        uninterrupted
    )
    assert not checkpoints[0].exists()  # removed once the run finished


def test_a_corrupt_checkpoint_is_a_clear_error_naming_it(prepared_tiny: Path):
    config = from_dict(tiny_params(prepared_tiny, epochs=2, max_images=64))
    with pytest.raises(RuntimeError, match="interrupted"):
        pretrain.run(config, method="rotation", callbacks=(StopAtEpoch(1),))
    (last,) = Path("checkpoints/pretrain").glob("rotation-*/last.ckpt")
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(MissingInputError, match=f"{last}.*corrupt.*delete"):
        pretrain.run(config, method="rotation")


def test_a_missing_policy_names_the_augment_stage(workdir: Path, tiny_idx: Path):
    config = from_dict(tiny_params(tiny_idx))
    download.run(config)
    split.run(config)
    with pytest.raises(MissingInputError, match="policy.json.*run the augment stage"):
        pretrain.run(config, method="simclr")


def test_a_method_not_in_params_is_refused(prepared_tiny: Path):
    config = from_dict(tiny_params(prepared_tiny, methods=["simclr"]))
    with pytest.raises(MissingInputError, match="'vae' is not in pretrain.methods"):
        pretrain.run(config, method="vae")


def test_encoders_load_back_and_a_corrupt_one_is_named(prepared_tiny: Path):
    from pipeline.models.encoders import load_encoder

    config = from_dict(tiny_params(prepared_tiny, epochs=1))
    pretrain.run(config, method="autoencoder")
    encoder, description = load_encoder("autoencoder")
    assert description.method == "autoencoder"
    assert encoder(torch.zeros(2, 1, 8, 8)).shape == (2, description.feature_dim)

    weights = Path("models/pretrain/autoencoder/encoder.pt")
    weights.write_bytes(weights.read_bytes()[:50])
    remedy = "pretrain --method autoencoder"
    with pytest.raises(MissingInputError, match=f"{weights}.*corrupt.*{remedy}"):
        load_encoder("autoencoder")
    torch.save({"not": "tensors", "code": print}, weights)  # a pickle that would run code
    with pytest.raises(MissingInputError, match="not a plain state_dict"):
        load_encoder("autoencoder")
    with pytest.raises(MissingInputError, match="encoder.json is missing"):
        load_encoder("simclr")


def simclr_rank(rank: int, store: str, out_dir: str) -> None:
    """One of two gloo ranks: its half of a batch through PretrainModule's SimCLR objective."""
    import torch.distributed as dist

    from pipeline.models.losses import nt_xent, nt_xent_negatives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        module = _module("simclr", METHOD_OPTIONS["simclr"])
        images = torch.randint(
            0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
        )
        local = images[rank * 8 : (rank + 1) * 8]
        temperature = METHOD_OPTIONS["simclr"]["temperature"]
        with torch.no_grad():  # the objective's views, scored with and without the other rank
            generator = torch.Generator().manual_seed(rank)
            views = torch.cat([module.augment(local, generator) for _ in range(2)])
            z1, z2 = module.head(module.backbone(module.to_model_layout(views))).chunk(2)
            gathered = nt_xent(z1, z2, temperature, gather=True).item()
            alone = nt_xent(z1, z2, temperature, gather=False).item()
        loss = module.objective(local, torch.Generator().manual_seed(rank))[0]
        loss.backward()
        for parameter in module.parameters():  # what DDP does: average the gradients
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= 2
        torch.optim.SGD(module.parameters(), lr=0.1).step()
        result = {
            "negatives": nt_xent_negatives(8),
            "local_negatives": nt_xent_negatives(8, gather=False),
            "loss": loss.item(),
            "gathered": gathered,
            "alone": alone,
            # parameters only: BN running statistics are per rank (DDP broadcasts rank 0's)
            "state": {k: v.detach().clone() for k, v in module.backbone.named_parameters()},
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_two_process_simclr_step_sees_the_other_ranks_negatives(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.start_processes(
        simclr_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert result["negatives"] == 2 * 8 * 2 - 2 == 30  # twice the views of one rank ...
        assert result["local_negatives"] == 2 * 8 - 2 == 14  # ... minus self and positive
        assert result["loss"] == pytest.approx(result["gathered"], abs=1e-5)
        assert result["gathered"] > result["alone"]  # more negatives, strictly larger loss
    for name, tensor in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], tensor, msg=name)
