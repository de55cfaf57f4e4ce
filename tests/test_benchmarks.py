"""The benchmarks run and report, on tiny data (no timing is asserted: the machine is shared).

Why: `make benchmarks` is run rarely, on a quiet machine; a benchmark that broke since would
only be found then. These tests run the real measuring code for a step or two. The whole-pipeline
benchmark (benchmarks/pipeline.py) is measured in tests/test_runners.py, on the Snakemake run
that the runner checks read too (one run of minutes instead of two).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import pretrain, report
from tests.conftest import REPO

PRETRAIN_KEYS = {
    "ours_img_s",
    "per_sample_img_s",
    "ratio",
    "model_only_img_s",
    "backbone",
    "width",
    "batch_size",
    "steps",
    "rounds",
    "machine",
    "resnet18_w32_img_s",
    "device",
    "precision",
}


@pytest.fixture
def threads() -> Iterator[None]:
    """run() sets torch's thread count for the process; give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_pretrain_benchmark_measures_both_paths(threads: None) -> None:
    images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8)
    result = pretrain.run(
        steps=2,
        params=REPO / "params.yaml",
        images=images,
        data="random",
        batch_size=64,
        rounds=1,
        warmup=1,
        resnets=[{"width": 32, "batch_size": 16, "steps": 1}],
        device=torch.device("cpu"),
    )
    assert not PRETRAIN_KEYS - result.keys()
    for key in ("ours_img_s", "per_sample_img_s", "model_only_img_s", "resnet18_w32_img_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["ours_img_s"] / result["per_sample_img_s"])
    assert (result["backbone"], result["batch_size"], result["device"]) == ("lenet5", 64, "cpu")
    assert result["machine"]["command"].startswith("python -m benchmarks.pretrain")
    json.loads(json.dumps(result))  # what --json writes


def test_two_view_dataset_gives_two_different_views() -> None:
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    policy = pretrain.module_kwargs(REPO / "params.yaml")["policy"]
    dataset = pretrain.TwoViewDataset(images, pretrain.torchvision_views(policy, 1, 28))
    first, second = dataset[0]
    assert first.shape == second.shape == (1, 28, 28) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def _machine(gpu: str | None) -> dict[str, Any]:
    return {
        "date": "2025-01-01 00:00 UTC",
        "cpu": "Test CPU",
        "cores": 2,
        "gpu": gpu,
        "python": "3.11",
        "torch": "2.x",
        "command": "python -m benchmarks.x",
    }


def _augment_result() -> dict[str, Any]:
    return {
        "batched_img_s": 100_000.0,
        "kornia_img_s": 50_000.0,
        "per_sample_img_s": 5_000.0,
        "cifar_batched_img_s": 20_000.0,
        "cifar_kornia_img_s": 10_000.0,
        "ratio": 20.0,
        "batch_size": 512,
        "threads": 2,
        "rounds": 3,
        "batches": 20,
        "machine": _machine(None),
    }


def _pretrain_result(gpu: str | None) -> dict[str, Any]:
    util = 50.0 if gpu else None
    resnets = [{"width": 32, "batch_size": 256, "steps": 5, "img_s": 150.0, "gpu_util_pct": util}]
    if gpu:
        resnets.append(
            {"width": 64, "batch_size": 512, "steps": 20, "img_s": 9_000.0, "gpu_util_pct": 90.0}
        )
    return {
        "ours_img_s": 900.0,
        "per_sample_img_s": 300.0,
        "ratio": 3.0,
        "target_ratio": 3.0,
        "model_only_img_s": 1_000.0,
        "backbone": "lenet5",
        "width": 32,
        "batch_size": 256,
        "steps": 20,
        "rounds": 3,
        "warmup_steps": 2,
        "threads": 2,
        "workers": 2,
        "device": gpu or "cpu",
        "precision": "bf16-mixed" if gpu else "32-true",
        "gpu_util_ours_pct": util,
        "gpu_util_per_sample_pct": util,
        "optimizer": "adamw",
        "simclr": {"temperature": 0.5},
        "data": "fashion-mnist",
        "resnet18": resnets,
        "resnet18_w32_img_s": 150.0,
        "machine": _machine(gpu),
    }


@pytest.mark.parametrize("gpu", [None, "NVIDIA H100"])
def test_report_renders_both_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu: str | None
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "augment.json").write_text(json.dumps(_augment_result()))
    (results / "pretrain.json").write_text(json.dumps(_pretrain_result(gpu)))
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "OUT", tmp_path / "BENCHMARKS.md")
    report.main()
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Augmentation throughput (`benchmarks/augment.py`)" in text
    assert "**Batched vs per-sample: 20.0×** (target ≥ 10×)" in text
    assert "## SimCLR pretraining throughput (`benchmarks/pretrain.py`)" in text
    assert "**Ours vs per-sample: 3.0×** (target ≥ 3×: met)" in text
    assert "| 900 |" in text and "| 300 |" in text
    assert ("GPU util" in text) == bool(gpu)
    assert ("resnet18 w64, batch 512" in text) == bool(gpu)


def test_gpu_utilization_samples_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler's parsing and thread, against a stand-in nvidia-smi (no GPU needed)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\ncase "$*" in *--id=GPU-x*) echo 42;; *) echo "[N/A]";; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pretrain.GpuUtilization("GPU-x", interval=0.01) as sampler:
        deadline = time.monotonic() + 10
        while not sampler.samples and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sampler.samples and sampler.mean == 42.0
    with pretrain.GpuUtilization("GPU-other", interval=0.01) as unsupported:
        time.sleep(0.1)
    assert unsupported.mean is None  # "[N/A]" is skipped, not an error
    assert pretrain.GpuUtilization(None).mean is None


def _write_study(
    root: Path,
    params: dict,
    validation: dict[str, float],
    test: dict[str, dict[str, float]],
    answer: dict[str, dict],
) -> Path:
    """A project folder as the pipeline leaves it for ``quality``: params.yaml, one validation
    file per cell (``validation``: cell name -> val_acc_mean), metrics/summary.json (``test``:
    init-mode -> budget -> mean test accuracy, an interval of +-1 point; ``answer`` as is) and
    the pretraining kNN monitors."""
    from pipeline import paths
    from tests.conftest import write_params

    write_params(root, params)
    (root / "metrics/finetune").mkdir(parents=True)
    for cell, value in validation.items():
        (root / "metrics/finetune" / f"{cell}.json").write_text(json.dumps({"val_acc_mean": value}))
    accuracy = {
        model: {
            paths.metric_key(budget): {
                "mean": mean,
                "std": 0.0,
                "ci_low": mean - 0.01,
                "ci_high": mean + 0.01,
                "n_seeds": 1,
            }
            for budget, mean in means.items()
        }
        for model, means in test.items()
    }
    summary = {"test_accuracy": accuracy, "answer": answer}
    (root / "metrics/summary.json").write_text(json.dumps(summary))
    (root / "metrics/pretrain").mkdir()
    for method, knn in (("scratch", 0.70), ("pixels", 0.78), ("simclr", 0.80)):
        (root / "metrics/pretrain" / f"{method}.json").write_text(json.dumps({"val_knn_acc": knn}))
    return root


def _pipeline_result(quality: dict[str, Any]) -> dict[str, Any]:
    """A benchmarks/results/pipeline.json around ``quality``, for the report."""
    from benchmarks import pipeline

    return {
        "machine": _machine(None),
        "cores": 2,
        "commit": "0" * 40,
        "total_seconds": 600.0,
        "stages": {},
        "quality": quality,
        "summary_markdown": "",
        "reruns": {
            "snakemake_noop_seconds": 1.0,
            "dvc_noop_seconds": 1.0,
            "param_change": "finetune.label_smoothing: 0.1 -> 0.15",
            "param_change_jobs": {"finetune": 1},
            "param_change_seconds": 10.0,
        },
        "targets": pipeline.TARGETS,
    }


def test_quality_reads_a_per_class_grid_and_counts_semi_as_self_supervised(
    tmp_path: Path,
) -> None:
    """The keys of ``quality`` on hand-made metrics: 4, 25 and all labels per class, a semi cell
    whose init is a baseline (``scratch``), and a tie that the study breaks by matrix order."""
    from benchmarks import pipeline
    from tests.conftest import params_for, sync_matrix

    params = params_for()
    params["split"].update(label_fractions=None, labels_per_class=[4, 25, "all"])
    params["pretrain"]["methods"] = ["scratch", "pixels", "simclr"]
    sync_matrix(params)
    params["finetune"].update(modes=["knn", "linear"], baseline_modes=["knn"])
    params["finetune"]["semi"].update(inits=["scratch"], fractions=["4pc"])
    budgets = ("4pc", "25pc", "all")
    validation_by_model = {
        "scratch-knn": (0.60, 0.75, 0.85),
        "scratch-linear": (0.55, 0.70, 0.80),
        "simclr-knn": (0.64, 0.80, 0.88),
        "simclr-linear": (0.63, 0.80, 0.91),  # ties simclr-knn at 25pc: the matrix's first wins
        "pixels-knn": (0.62, 0.72, 0.84),
    }
    validation = {
        f"{model}-{budget}": value
        for model, values in validation_by_model.items()
        for budget, value in zip(budgets, values, strict=True)
    } | {"scratch-semi-4pc": 0.70}  # the best at 4pc: semi learns from unlabeled images too
    test = {
        model: {budget: value - 0.01 for budget, value in zip(budgets, values, strict=True)}
        for model, values in validation_by_model.items()
    } | {"scratch-semi": {"4pc": 0.69}}  # at one budget only: no gains
    test["pixels-knn"]["all"] = 0.70  # less than at 25pc: short of the gain target
    answer = {
        "4pc": {
            "budget": "4pc",
            "ssl_cell": "scratch-semi",
            "baseline_cell": "pixels-knn",
            "ssl_accuracy": 0.69,
            "baseline_accuracy": 0.61,
            "difference": 0.08,
            "ci_low": 0.05,
            "ci_high": 0.11,
        }
    }
    quality = pipeline.quality(_write_study(tmp_path, params, validation, test, answer))

    assert quality["budgets"] == ["4pc", "25pc", "all"]
    assert quality["largest"] == {
        "cell": "simclr-linear-all",
        "budget": "all",
        "val": 0.91,
        "test": 0.90,
        "ci": [pytest.approx(0.89), pytest.approx(0.91)],
    }
    assert quality["second_ssl"]["cell"] == "simclr-knn-25pc"  # as the evaluate stage chooses
    assert quality["smallest_ssl"]["cell"] == "scratch-semi-4pc"
    assert quality["smallest_baseline"]["cell"] == "pixels-knn-4pc"
    assert quality["smallest_gain"] == pytest.approx(0.08)
    assert quality["answer"] == answer
    assert sorted(quality["gains"]) == sorted(validation_by_model)  # not scratch-semi
    assert quality["gains"]["simclr-knn"] == {
        "4pc->25pc": pytest.approx(0.16),
        "25pc->all": pytest.approx(0.08),
    }
    assert list(quality["gains"]["pixels-knn"]) == ["4pc->25pc", "25pc->all"]
    assert quality["knn"]["margin_over_pixels"] == pytest.approx(0.02)

    text = "\n".join(report._pipeline(_pipeline_result(quality)))
    assert (
        "| all labels, best cell | simclr-linear-all (val 91.00 %) | 90.00 % [89.0, 91.0] | "
        "≥ 93 % | not met |"
    ) in text
    assert "| 25 labels per class, best self-supervised or semi cell | simclr-knn-25pc" in text
    assert (
        "| 4 labels per class: best self-supervised − best baseline | scratch-semi-4pc vs "
        "pixels-knn-4pc | 69.00 % − 61.00 % = +8.00 points | ≥ 5 points | met |"
    ) in text
    assert "| 4 of 5 cells | short: pixels-knn |" in text
    assert "| +2.00 points | ≥ 3 points | not met |" in text
    assert (
        "| 4 labels per class | scratch-semi 69.00 % | pixels-knn 61.00 % | "
        "+8.00 points [+5.00, +11.00] |"
    ) in text
    assert "| init-mode | 4 per class → 25 per class | 25 per class → all |" in text
    assert "| simclr-knn | +16.00 | +8.00 |" in text


def test_quality_with_one_label_fraction_measures_what_it_can(tmp_path: Path) -> None:
    """One budget: it is the smallest and the largest, there is no second one and no gain."""
    from benchmarks import pipeline
    from tests.conftest import params_for, sync_matrix

    params = params_for()
    params["split"].update(labels_per_class=None, label_fractions=[1.0])
    params["pretrain"]["methods"] = ["scratch", "simclr"]
    sync_matrix(params)
    params["finetune"]["modes"] = ["knn"]
    params["finetune"]["semi"].update(inits=[], fractions=[])
    validation = {"scratch-knn-1.0": 0.80, "simclr-knn-1.0": 0.85}
    test = {"scratch-knn": {"1.0": 0.79}, "simclr-knn": {"1.0": 0.86}}
    quality = pipeline.quality(_write_study(tmp_path, params, validation, test, {}))

    assert quality["budgets"] == ["1.0"]
    assert quality["largest"]["cell"] == quality["smallest_ssl"]["cell"] == "simclr-knn-1.0"
    assert quality["smallest_baseline"]["cell"] == "scratch-knn-1.0"
    assert quality["smallest_gain"] == pytest.approx(0.07)
    assert quality["second_ssl"] is None and quality["gains"] == {}
    text = "\n".join(report._pipeline(_pipeline_result(quality)))
    assert "| second-largest budget, best self-supervised or semi cell | – | – |" in text
    assert "| 100 % labels: best self-supervised − best baseline | simclr-knn-1.0 vs" in text


def test_quality_names_a_label_fraction_grid_in_percent(tmp_path: Path) -> None:
    """Budgets as label fractions (the whole-run test in tests/test_runners.py has per-class
    ones): 10 % is the smallest and the second largest budget, and the report says "10 %"."""
    from benchmarks import pipeline
    from tests.conftest import params_for, sync_matrix

    params = params_for()
    params["split"].update(labels_per_class=None, label_fractions=[0.1, 1.0])
    params["pretrain"]["methods"] = ["scratch", "simclr"]
    sync_matrix(params)
    params["finetune"]["modes"] = ["knn"]
    params["finetune"]["semi"].update(inits=[], fractions=[])
    validation = {
        "scratch-knn-0.1": 0.70,
        "simclr-knn-0.1": 0.75,
        "scratch-knn-1.0": 0.80,
        "simclr-knn-1.0": 0.85,
    }
    test = {"scratch-knn": {"0.1": 0.69, "1.0": 0.79}, "simclr-knn": {"0.1": 0.76, "1.0": 0.86}}
    answer = {
        "0_1": {
            "budget": "0.1",
            "ssl_cell": "simclr-knn",
            "baseline_cell": "scratch-knn",
            "ssl_accuracy": 0.76,
            "baseline_accuracy": 0.69,
            "difference": 0.07,
            "ci_low": 0.02,
            "ci_high": 0.12,
        }
    }
    quality = pipeline.quality(_write_study(tmp_path, params, validation, test, answer))

    assert quality["budgets"] == ["0.1", "1.0"]
    assert quality["largest"]["cell"] == "simclr-knn-1.0"
    assert quality["second_ssl"]["cell"] == quality["smallest_ssl"]["cell"] == "simclr-knn-0.1"
    assert quality["smallest_baseline"]["cell"] == "scratch-knn-0.1"
    assert {model: list(steps) for model, steps in quality["gains"].items()} == {
        "scratch-knn": ["0.1->1.0"],
        "simclr-knn": ["0.1->1.0"],
    }
    text = "\n".join(report._pipeline(_pipeline_result(quality)))
    assert "| 10 % labels, best self-supervised or semi cell | simclr-knn-0.1 " in text
    assert "| 10 % labels | simclr-knn 76.00 % | scratch-knn 69.00 % |" in text
    assert "| init-mode | 10 % → 100 % |" in text


def test_cpu_benchmark_times_settings_interleaved_and_writes_its_section(
    threads: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks import cpu

    calls: list[str] = []
    steppers = {name: (lambda name=name: calls.append(name), 8) for name in ("a", "b")}
    speed = cpu.interleaved_speed(steppers, rounds=3, steps=2)
    assert set(speed) == {"a", "b"} and min(speed.values()) > 0
    assert calls == ["a", "a", "b", "b"] * 3  # rounds alternate between the settings
    # The real steps, a few of each: fine-tuning in both layouts and precisions, SimCLR.
    monkeypatch.setattr(cpu, "WARMUP", 1)
    backbone = {"name": "lenet5", "width": 8}
    for channels_last in (False, True):
        for bf16 in (False, True):
            step, first = cpu.finetune_stepper(backbone, 16, channels_last, bf16)
            step()
            assert first > 0
    step, batch = cpu.simclr_stepper(REPO / "params.yaml", bf16=True)
    step()
    assert batch == 256
    result = {
        "machine": {"date": "d", "cpu": "c", "cores": 2, "torch": "t", "command": "python -m x"},
        "finetune_step": [
            {
                "batch": 128,
                "channels_last": cl,
                "bf16": bf,
                "compiled": False,
                "images_per_s": 1000.0 * (1 + cl + bf),
                "first_steps_s": 0.1,
                "ratio": 1.0 + cl + bf,
            }
            for cl in (0, 1)
            for bf in (0, 1)
        ],
        "threads": {"one_process_2_threads": 100.0, "two_processes_1_thread": 120.0},
        "simclr": {"float32": 10.0, "bf16": 15.0},
        "accuracy": {"float32_contiguous": 0.85, "bf16_channels_last": 0.851},
        "accuracy_steps": 600,
    }
    text = "\n".join(report._cpu(result))
    assert "| 128 | bf16 autocast, channels-last | 3,000 | 3.00× |" in text
    assert "(1.20×)" in text and "(1.50×)" in text and "85.00 %" in text


def test_peer_benchmark_trains_both_engines_for_the_same_seconds(threads: None) -> None:
    pytest.importorskip("lightly")
    from benchmarks import peer

    if not peer.FASHION_MNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    result = peer.run(REPO / "params.yaml", seconds=2.0, every=1.0)
    for side in ("ours", "lightly"):
        curve = result[side]["curve"]
        assert curve[0]["seconds"] == 0.0 and curve[-1]["seconds"] >= 2.0
        assert all(0.0 < p["knn"] <= 1.0 for p in curve) and result[side]["images_per_s"] > 0
        assert [p["images"] for p in curve] == sorted(p["images"] for p in curve)
    assert result["lightly_final_knn"] == result["lightly"]["curve"][-1]["knn"]
    reached = result["ours_seconds_to_lightly_final"]
    assert reached is None or reached == peer.time_to_reach(
        result["ours"]["curve"], result["lightly_final_knn"]
    )
    text = "\n".join(
        report._peer(
            {
                **result,
                "machine": {"date": "d", "cpu": "c", "cores": 2, "torch": "t", "command": "x"},
            }
        )
    )
    assert "| lightly | 0 | 0 |" in text and "Images/s: ours" in text


def test_time_to_reach_is_the_first_point_at_or_above() -> None:
    from benchmarks.peer import time_to_reach

    curve = [
        {"seconds": 0.0, "knn": 0.7},
        {"seconds": 30.0, "knn": 0.8},
        {"seconds": 60.0, "knn": 0.79},
        {"seconds": 90.0, "knn": 0.85},
    ]
    assert time_to_reach(curve, 0.8) == 30.0 and time_to_reach(curve, 0.84) == 90.0
    assert time_to_reach(curve, 0.9) is None


def test_methods_benchmark_runs_each_method_through_the_stage_and_reports_it(
    workdir: Path, tiny_idx: Path
) -> None:
    from benchmarks import methods
    from pipeline.config import from_dict
    from pipeline.stages import augment, download, split
    from tests.conftest import write_params
    from tests.test_pretrain import tiny_params

    params = tiny_params(tiny_idx, max_images=64)
    params["pretrain"]["gan"]["latent_dim"] = 8
    config = from_dict(params)
    for stage in (download, split, augment):
        stage.run(config)
    params_file = write_params(workdir, params)
    out = workdir / "methods.json"
    argv = [
        "--epochs",
        "1",
        "--methods",
        "rotation,gan",
        "--params",
        str(params_file),
        "--root",
        str(workdir),
        "--json",
        str(out),
    ]
    assert methods.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["rotation", "gan"]
    for row in result["rows"]:
        assert 0 <= row["val_knn_acc"] <= 1 and row["seconds"] > 0 and row["epochs"] == 1
        assert row["curve"].startswith("epoch,train_loss,val_knn_acc,val_probe_acc")
    assert "d_fake" in result["rows"][1]["final"]
    section = "\n".join(report._methods(result))
    assert "| rotation |" in section and "| gan |" in section
    assert (
        methods.main(
            [*argv[:4], "--params", str(params_file), "--root", str(workdir / "elsewhere")]
        )
        == 1
    )
