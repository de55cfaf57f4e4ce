"""The GPU paths, and the GPU check that runs them (benchmarks/gpu.py, ``make gpu-check``).

Why: GPU time is rare and short, so what runs on it must already work. The tests marked ``gpu``
(skipped without CUDA) are what the check runs first on a GPU machine, ``pytest -m gpu``: every
method in bf16 through a Trainer, channels-last, augmentation and kNN on the device, the
synchronized batch norm DDP uses, checkpoints written on a GPU loaded anywhere. The others run
the check itself on the CPU, tiny, with MLflow, Snakemake and DVC unimportable as on a GPU
machine. Imports here stay within what a GPU machine has (torch, Lightning, PyYAML, pytest).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from benchmarks import pretrain as bench
from pipeline.methods import TRAINED
from tests.conftest import REPO, write_idx

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
SIZE, CLASSES = 28, 10


def raw_params() -> dict[str, Any]:
    """params.yaml as written (every key the modules below read is there; no jsonschema here)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def pretrain_kwargs(method: str, width: int = 8, batch: int = 64) -> dict[str, Any]:
    """PretrainModule arguments of ``method`` on a small ResNet-18 (global pooling: the model
    that trains channels-last)."""
    params = raw_params()
    params["pretrain"]["monitor"]["knn_max_train"] = 256
    return bench.module_kwargs(params, "resnet18", width, batch, n_images=256, method=method)


def split_data(batch: int = 64, train: int = 256, val: int = 64) -> Any:
    """The pipeline's SplitData over random class-visible images, filled in memory."""
    from pipeline.data.datamodule import SplitData

    generator = torch.Generator().manual_seed(0)
    data = SplitData("fashion_mnist", ("train", "val"), batch)
    for name, n in (("train", train), ("val", val)):
        labels = torch.arange(n) % CLASSES
        noise = torch.randint(0, 100, (n, 1, SIZE, SIZE), generator=generator)
        data.images[name] = (noise + 15 * labels[:, None, None, None]).to(torch.uint8)
        data.labels[name] = labels
    data.classes = [str(c) for c in range(CLASSES)]
    return data


def gpu_trainer(tmp_path: Path, **options: Any) -> L.Trainer:
    """One GPU, bf16 autocast (what ``trainer.precision: auto`` gives on CUDA), no logger."""
    from pipeline import third_party

    third_party.ignore_known_warnings()
    settings = {
        "accelerator": "gpu",
        "devices": 1,
        "precision": "bf16-mixed",
        "max_epochs": 1,
        "limit_train_batches": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**settings, **options})


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


# ------------------------------------------------------------------------------------------
# On CUDA (pytest -m gpu)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", TRAINED)
def test_every_method_trains_in_bf16_channels_last_on_cuda_through_a_trainer(
    method: str, tmp_path: Path
) -> None:
    from pipeline.models.pretrain import PretrainModule

    L.seed_everything(0, verbose=False)
    module = PretrainModule(**pretrain_kwargs(method))
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    seen: list[tuple[torch.dtype, bool]] = []
    conv = first_conv(module.backbone)
    hook = conv.register_forward_hook(
        lambda m, inputs, out: seen.append(
            (out.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    gpu_trainer(tmp_path).fit(module, datamodule=split_data())
    hook.remove()
    assert module.images["train"].device.type == "cuda"  # the data lived on the device
    row = module.history[-1]
    assert math.isfinite(row["train_loss"]) and 0 <= row["val_knn_acc"] <= 1
    assert seen and seen[0] == (torch.bfloat16, True)  # bf16 autocast, channels-last input
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    after = module.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before), "nothing trained"


@pytest.mark.gpu
@needs_cuda
def test_the_objective_gathers_and_augments_on_the_device() -> None:
    """The pipeline's step: indices and uint8 images on the GPU, views drawn there, seeded."""
    from pipeline.models.pretrain import PretrainModule

    module = PretrainModule(**pretrain_kwargs("simclr")).to(CUDA)
    images = split_data().images["train"].to(CUDA)
    batch = images[torch.randperm(len(images), device=CUDA)[:64]]

    def views(seed: int) -> torch.Tensor:
        return module.augment(batch, torch.Generator(device=CUDA).manual_seed(seed))

    first = views(0)
    assert first.device.type == "cuda" and first.dtype == torch.float32
    assert torch.equal(first, views(0)) and not torch.equal(first, views(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, features, rows = module.objective(batch, torch.Generator(device=CUDA).manual_seed(0))
    assert loss.device.type == "cuda" and math.isfinite(float(loss.detach()))
    assert features.shape[0] == rows.shape[0] == 64


@pytest.mark.gpu
@needs_cuda
def test_knn_on_the_device_chooses_what_it_chooses_on_the_cpu() -> None:
    from pipeline.models.knn import best_knn

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, 32, generator=generator)
    labels = torch.arange(600) % CLASSES
    features = centres[labels] + 0.8 * torch.randn(600, 32, generator=generator)
    grid = ([5, 10, 20], [0.03, 0.07, 0.2])
    cpu = best_knn(features[:500], labels[:500], features[500:], labels[500:], *grid, CLASSES)
    on_gpu = [t.to(CUDA) for t in (features[:500], labels[:500], features[500:], labels[500:])]
    gpu = best_knn(*on_gpu, *grid, CLASSES)
    assert gpu[1:] == cpu[1:] and gpu[0] == pytest.approx(cpu[0], abs=1e-9)
    assert 0.5 < cpu[0] <= 1.0  # the clusters are learnable: the comparison means something


@pytest.mark.gpu
@needs_cuda
def test_ddp_on_gpus_trains_with_synchronized_batch_norm(tmp_path: Path) -> None:
    """What pipeline/training.py asks of Lightning under DDP on CUDA: NCCL and sync_batchnorm
    (one process here; the conversion is the same for any number)."""
    import torch.distributed as dist

    from pipeline import training
    from pipeline.config import TrainerConfig
    from pipeline.models.pretrain import PretrainModule

    settings = TrainerConfig(precision="auto", devices=1, strategy="ddp")
    strategy = training._strategy(settings)
    sync = settings.distributed and torch.cuda.is_available()  # make_trainer's rule
    assert sync and strategy.process_group_backend == "nccl"
    kinds: list[set[str]] = []

    class Probe(L.Callback):
        def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            kinds.append(
                {type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__}
            )

    module = PretrainModule(**pretrain_kwargs("simclr"))
    environ = dict(os.environ)  # Lightning's DDP launcher sets MASTER_ADDR, LOCAL_RANK, ...
    try:
        trainer = gpu_trainer(
            tmp_path,
            strategy=strategy,
            sync_batchnorm=sync,
            precision=training.precision(settings.precision),
            callbacks=[Probe()],
        )
        trainer.fit(module, datamodule=split_data())
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert kinds == [{"SyncBatchNorm"}]  # every batch norm converted, the heads' 1-D ones too
    assert math.isfinite(module.history[-1]["train_loss"])


@pytest.mark.gpu
@needs_cuda
def test_weights_saved_on_a_gpu_load_on_the_cpu(tmp_path: Path) -> None:
    """An encoder.pt and a checkpoint written from CUDA tensors load with map_location (the
    pipeline's loaders), onto the CPU, equal, and run again on the GPU."""
    from pipeline import training
    from pipeline.documents import EncoderDescription
    from pipeline.models.backbones import BackboneConfig, build_backbone
    from pipeline.models.encoders import load_encoder

    kwargs = pretrain_kwargs("simclr")
    encoder = build_backbone(BackboneConfig(**kwargs["backbone"]), 1, SIZE).to(CUDA)
    state = encoder.state_dict()
    assert all(v.device.type == "cuda" for v in state.values())
    folder = tmp_path / "simclr"
    folder.mkdir()
    torch.save(state, folder / "encoder.pt")
    description = EncoderDescription(
        method="simclr",
        kind="backbone",
        backbone=kwargs["backbone"],
        in_channels=1,
        image_size=SIZE,
        feature_dim=int(encoder.feature_dim),
        mean=kwargs["mean"],
        std=kwargs["std"],
        dataset="fashion_mnist",
        dataset_checksum="0" * 64,
    )
    (folder / "encoder.json").write_text(json.dumps(description.as_dict()))
    loaded, _ = load_encoder("simclr", folder)
    for key, value in loaded.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, state[key].cpu()), key
    out = loaded.to(CUDA).eval()(torch.zeros(2, 1, SIZE, SIZE, device=CUDA))
    assert out.device.type == "cuda" and out.shape == (2, encoder.feature_dim)
    torch.save({"state_dict": state, "epoch": 0}, tmp_path / "last.ckpt")
    checkpoint = training.load_checkpoint(tmp_path / "last.ckpt", "a test checkpoint")
    assert all(v.device.type == "cpu" for v in checkpoint["state_dict"].values())


@pytest.mark.gpu
@needs_cuda
def test_fine_tuning_trains_every_layer_in_bf16_on_cuda(tmp_path: Path) -> None:
    from pipeline.augment import BatchAugment, resolve_policy
    from pipeline.models.backbones import BackboneConfig, build_backbone
    from pipeline.models.classifier import LinearClassifier
    from pipeline.models.finetune import FinetuneModule, Recipe

    params = raw_params()
    kwargs = pretrain_kwargs("simclr")
    encoder = build_backbone(BackboneConfig(**kwargs["backbone"]), 1, SIZE)
    classifier = LinearClassifier(encoder, encoder.feature_dim, CLASSES)
    policy = resolve_policy(params["augment"]["policies"]["supervised"])
    shape = ((SIZE, SIZE), 1, kwargs["mean"], kwargs["std"])
    module = FinetuneModule(
        classifier,
        "finetune",
        BatchAugment(policy, *shape),
        BatchAugment({}, *shape),
        Recipe(params["finetune"]["optimizer"], total_steps=6, seed=0),
    )
    before = first_conv(encoder).weight.detach().clone()
    gpu_trainer(tmp_path, max_epochs=2).fit(module, datamodule=split_data())
    assert len(module.history) == 2 and 0 <= module.best_acc <= 1
    assert first_conv(encoder).weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(before, first_conv(encoder).weight.detach().cpu())


# ------------------------------------------------------------------------------------------
# The check itself, on the CPU
# ------------------------------------------------------------------------------------------

#: What a GPU machine has not got: the check must run without importing any of them.
ABSENT = ("mlflow", "snakemake", "dvc")
_BLOCKER = """
import sys

# As on a GPU machine, these are not installed: an import raises ModuleNotFoundError and
# importlib.util.find_spec, which libraries use to probe, says None (a finder that raised there
# would break torch's own probing).
for name in {absent!r}:
    sys.modules[name] = None
"""


def absent_env(tmp_path: Path, absent: tuple[str, ...] = ABSENT) -> dict[str, str]:
    """An environment whose Python processes cannot import ``absent`` (a sitecustomize)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER.format(absent=set(absent)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


def profile_job_count(folder: Path) -> int:
    """The jobs the GPU profile makes, counted another way than the check counts them: the
    config's pretraining methods and cells, and one job for each stage that does not loop."""
    from pipeline import dag
    from pipeline.config import load
    from pipeline.profile import apply

    text, _ = apply(REPO / "params.yaml", REPO / "params.gpu.yaml")
    (folder / "params.yaml").write_text(text)
    config = load(folder / "params.yaml")
    singles = sum(1 for s in dag.STAGES if s.loop is None)
    return singles + len(config.pretrain.methods) + len(config.finetune.cells())


def test_the_check_runs_on_the_cpu_without_mlflow_snakemake_or_dvc(tmp_path: Path) -> None:
    from benchmarks import report

    env = absent_env(tmp_path)
    refused = subprocess.run([sys.executable, "-c", "import mlflow"], env=env, capture_output=True)
    assert b"ModuleNotFoundError: import of mlflow halted" in refused.stderr  # the blocker works
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["smoke"] and not result["errors"]
    assert not set(ABSENT) & set(result["third_party_modules"])
    tests = result["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # no CUDA here
    assert "tests/test_gpu.py" in tests["files"]
    speed = result["throughput"]["methods"]
    listed = yaml.safe_load((REPO / "params.gpu.yaml").read_text())["pretrain"]["methods"]
    assert set(speed) == {"simclr"} | {m for m in listed if m in TRAINED}
    for method, rates in speed.items():
        for key in ("ours_img_s", "ceiling_img_s", "lightning_img_s"):
            assert math.isfinite(rates[key]) and rates[key] > 0, (method, key)
    assert result["throughput"]["per_sample"]["img_s"] > 0
    cost = result["extrapolation"]
    assert cost["job_count"] == profile_job_count(tmp_path) == sum(cost["jobs"].values())
    assert cost["total_s"] > 0 and cost["total_s"] == pytest.approx(sum(cost["parts_s"].values()))
    assert cost["fixed_cost_s"] > 0 and cost["parts_s"]["fixed"] > 0
    study = result["mini_study"]
    assert study["epochs_run"] >= 1 and len(study["history"]) == study["epochs_run"]
    for value in (*study["knn"].values(), *study["finetune"].values()):
        assert 0 <= value["val_acc"] <= 1
    section = "\n".join(report._gpu(result))
    assert "## GPU check (`benchmarks/gpu.py`, `make gpu-check`)" in section
    assert "**Smoke run**" in section and "| simclr |" in section
    assert f"({cost['job_count']} jobs:" in section


def test_a_smoke_run_never_writes_the_real_result(tmp_path: Path) -> None:
    from benchmarks import gpu

    for path in (REPO / gpu.RESULT, gpu.RESULT):  # absolute, and as written from the repository
        with pytest.raises(SystemExit):
            gpu.main(["--smoke", "--json", str(path)])


def test_pack_keeps_the_arrays_and_the_plan_that_a_machine_without_yaml_libraries_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import gpu

    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (300, SIZE, SIZE)),
        "train-labels-idx1-ubyte.gz": np.arange(300) % CLASSES,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (50, SIZE, SIZE)),
        "t10k-labels-idx1-ubyte.gz": np.arange(50) % CLASSES,
    }
    for name, array in arrays.items():
        write_idx(source / name, array)
    params, profile = REPO / "params.yaml", REPO / "params.gpu.yaml"
    packed = gpu.pack(source, tmp_path / "data.npz", params, profile)
    assert 0 < packed["mib"] < gpu.PACK_LIMIT / 2**20
    images = gpu.load_images(tmp_path / "data.npz", gpu.FULL)
    assert images.train_images.shape == (300, SIZE, SIZE, 1)
    assert np.array_equal(images.train_images[..., 0], arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(images.test_labels, arrays["t10k-labels-idx1-ubyte.gz"])
    live = gpu.live_plan(params, profile)
    for name in ("jsonschema", "jsonschema.exceptions", "ruamel", "ruamel.yaml"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a machine without them
    plan = gpu.resolve_plan(params, profile, images.plan, "data.npz")
    assert "packed in data.npz" in plan.source and "stale" not in plan.source
    assert (plan.params, plan.cells, plan.jobs) == (live.params, live.cells, live.jobs)
    with pytest.raises(SystemExit, match="--pack"):
        gpu.resolve_plan(params, profile, None, "data.npz")


def test_the_estimate_counts_each_part_and_bounds_jobs_run_at_once(tmp_path: Path) -> None:
    """The profile's size where no GPU is lent: FLOPs over a rate, on the check's own plan."""
    from benchmarks import gpu, gpu_estimate

    ctx = gpu_estimate.context(None, tmp_path, gpu.SMOKE)
    start_up = {"seconds": 5.0}  # a job's start-up (measured by gpu.fixed_cost when not given)
    cost = gpu_estimate.estimate(ctx, tflops=1.0, overhead_ms=0.0, at_once=4, fixed=start_up)
    assert cost["parts_s"]["fixed"] == 5.0 * cost["job_count"]
    flops = cost["flops"]["step_per_image"]
    forward = cost["flops"]["encoder_forward_per_image"]
    # SimCLR: two views forward and backward (about 3 forwards each); BYOL adds its teacher's
    # two forwards; a pretext task sees one view.
    assert 5.5 * forward < flops["simclr"] < 6.5 * forward
    assert flops["byol"] > flops["simclr"] + 1.5 * forward
    assert flops["rotation"] < flops["simclr"]
    by_mode = cost["finetune_by_mode_s"]
    assert by_mode["semi"] > 0 and by_mode["knn"] < by_mode["finetune"]
    work = cost["parts_s"]["pretrain"] + cost["parts_s"]["finetune"]
    assert cost["at_once_s"] == pytest.approx(max(work, cost["total_s"] / 4))
    # A trained method's epochs: its steps' FLOPs over the rate, plus its monitor.
    epoch = cost["epoch_images"] * flops["simclr"] / 1e12
    monitor = cost["pretrain_s"]["scratch"]  # a reference encoder: one monitor pass
    assert cost["pretrain_s"]["simclr"] == pytest.approx(cost["epochs"] * (epoch + monitor))
