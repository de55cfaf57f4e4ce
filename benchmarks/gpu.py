"""GPU check: the GPU tests, every method's speed, the GPU profile's cost and a mini-study.

    python -m benchmarks.gpu [--data FILE.npz|DIR] [--budget S] [--json OUT]   (make gpu-check)
    python -m benchmarks.gpu --pack FILE.npz [--source DIR]    (where the data and params are)
    python -m benchmarks.gpu --smoke [--json OUT]              (the same on the CPU, tiny, < 1 min)

Why: GPU time comes in short, rare slots, so one command answers what a slot can, in at most
LIMIT_S (8 minutes) on one H200, and writes it all to benchmarks/results/gpu.json (and to
``$OUT`` when that is set), whose section of BENCHMARKS.md it regenerates:

1. tests: ``pytest -m gpu`` in a subprocess, over the test files that mark GPU tests;
2. throughput: pretraining images/s of the GPU profile's model and batch (ResNet-18 width 64,
   batch 512, bf16) for SimCLR and every trained method of the profile's pretrain.methods, three
   ways: ours (uint8 data on the device, PretrainModule.objective, backward, step), the model
   step alone on replayed views (the ceiling; goal: ours >= GOAL x ceiling), and SimCLR through
   a per-sample torchvision DataLoader with 8 workers; plus every method through a real Lightning
   Trainer, whose rate and validation monitor time cost its epochs below;
3. fine-tuning: one pass (an epoch: its steps and one validation) at every label budget, for
   every mode the profile runs there, through the real FinetuneModule and a Trainer;
4. extrapolation: the whole profile's time on this GPU, one job after another: pretraining
   epochs x methods + fine-tuning cells x passes x seeds + jobs x a per-job fixed cost that is
   measured (a fresh process importing Lightning and the model code, CUDA init, the training
   images to the device); jobs counted from pipeline/dag.py on the profile merged by
   pipeline.profile;
5. mini-study (``--budget`` seconds): SimCLR on the profile's model for as many epochs as fit,
   validation kNN of its features vs raw pixels, and one fine-tuning cell at the smallest label
   budget from that encoder vs from scratch.

Every part records its numbers or its error and the rest still runs (a slot is not spent twice
on one crash); the JSON is rewritten after each part. Nothing here imports MLflow, Snakemake or
DVC: GPU machines have none. It needs torch, lightning, torchmetrics, numpy and PyYAML (which
lightning requires); torchvision for the per-sample baseline, pytest for the tests. The profile
is merged and validated where ruamel.yaml and jsonschema are installed; elsewhere the plan that
``--pack`` stored beside the data is used (and said so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from benchmarks import pretrain as bench
from benchmarks.machine import describe, save_result
from pipeline import paths
from pipeline.methods import TRAINED

PARAMS = Path("params.yaml")
PROFILE = Path("params.gpu.yaml")
RESULT = Path("benchmarks/results/gpu.json")
ROOT = Path(__file__).resolve().parent.parent  # the repository (commands run from there)
#: Where ``--pack`` puts the data by default and where the check looks for it first.
DEFAULT_DATA = Path("benchmarks/data/fashion_mnist.npz")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
PACK_LIMIT = 60 * 2**20  # what may travel with the working tree to a GPU machine
LIMIT_S = 480.0  # the whole check, on one H200
GOAL = 0.9  # ours / ceiling images/s
DATASET = "fashion_mnist"  # the name SplitData is given; its files are never read here
#: Modes whose cells train for passes (kNN fits once); the order the tables show.
TRAINED_MODES = ("linear", "finetune", "semi")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Sizes:
    """How much the check measures. FULL is the GPU check; SMOKE shrinks every number (model,
    batches, steps, budgets) so a CPU runs the same code in well under a minute."""

    backbone: str | None  # None: the profile's model.backbone and model.width
    width: int | None
    batch: int | None  # None: the profile's batch sizes; else an upper bound on each
    steps: int  # timed steps per round
    rounds: int  # best of
    warmup: int  # untimed steps first
    workers: int  # the per-sample DataLoader's
    finetune_steps: int  # timed steps of each fine-tuning pass
    cell_batches: int | None  # the mini-study's cells: batches per epoch (None: all)
    cell_epochs: int | None  # and at most this many epochs (None: the budget's cap)
    budget: float  # the mini-study's seconds
    limit: float  # the whole check's seconds (the mini-study gets what is left, at most budget)
    tests_timeout: float
    train_images: int = 0  # generated data when no --data: images per split (0: must be given)
    test_images: int = 0


FULL = Sizes(
    backbone=None,
    width=None,
    batch=None,
    steps=20,
    rounds=3,
    warmup=3,
    workers=8,
    finetune_steps=10,
    cell_batches=None,
    cell_epochs=None,
    budget=180.0,
    limit=LIMIT_S,
    tests_timeout=200.0,
)
SMOKE = Sizes(
    backbone="lenet5",
    width=4,
    batch=16,
    steps=2,
    rounds=1,
    warmup=1,
    workers=2,
    finetune_steps=2,
    cell_batches=4,
    cell_epochs=2,
    budget=4.0,
    limit=300.0,
    tests_timeout=90.0,
    train_images=1300,
    test_images=200,
)


# ------------------------------------------------------------------------------------------
# The plan: what the GPU profile asks for
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The GPU profile as the runners would see it, always from a real, validated Config.

    ``params`` is ``Config.raw`` of params.yaml with the profile merged in (defaults filled);
    ``cells`` is ``Config.finetune.cells()`` (fractions by name), ``jobs`` the jobs of each stage
    of pipeline/dag.py. ``hashes`` are those of the two files it was made from, so a plan packed
    on another machine can say whether they changed since.
    """

    params: dict[str, Any]
    cells: tuple[tuple[str, str, str], ...]
    jobs: dict[str, int]
    hashes: dict[str, str]
    source: str

    @classmethod
    def from_config(cls, config: Any, hashes: dict[str, str], source: str) -> Plan:
        from pipeline import dag

        cells = tuple((i, m, paths.fraction_name(f)) for i, m, f in config.finetune.cells())
        jobs: dict[str, int] = {}
        for stage in dag.STAGES:
            if stage.loop is None:
                jobs[stage.name] = 1
            elif stage.loop[0] == "foreach":
                jobs[stage.name] = len(config.section(stage.loop[1]))
            else:  # a matrix: the product of its fields' lists (a params key or literal values)
                fields = stage.loop[1]
                sizes = [
                    len(v) if isinstance(v, tuple) else len(config.section(v)) for _, v in fields
                ]
                jobs[stage.name] = math.prod(sizes)
        cell_jobs = sum(n for s, n in jobs.items() if dag.stage(s).command == "finetune")
        if cell_jobs != len(cells):
            raise RuntimeError(
                f"pipeline/dag.py's fine-tuning stages make {cell_jobs} jobs but the config has "
                f"{len(cells)} cells: the two no longer agree"
            )
        return cls(copy.deepcopy(config.raw), cells, jobs, hashes, source)

    def to_json(self) -> str:
        return json.dumps(
            {"params": self.params, "cells": self.cells, "jobs": self.jobs, "hashes": self.hashes}
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> Plan:
        raw = json.loads(text)
        cells = tuple(tuple(c) for c in raw["cells"])
        return cls(raw["params"], cells, raw["jobs"], raw["hashes"], source)

    @property
    def job_count(self) -> int:
        return sum(self.jobs.values())


def file_hashes(params: Path, profile: Path) -> dict[str, str]:
    """The two files' SHA-256, by role (the same files may be named by other paths)."""
    return {
        role: hashlib.sha256(path.read_bytes()).hexdigest()
        for role, path in (("params", params), ("profile", profile))
    }


def live_plan(params: Path = PARAMS, profile: Path = PROFILE) -> Plan:
    """Merge ``profile`` into ``params`` with pipeline.profile and read the result with
    pipeline.config, as ``python -m pipeline profile`` and then every stage would. Needs
    ruamel.yaml and jsonschema (ModuleNotFoundError where they are missing)."""
    from pipeline.config import load
    from pipeline.profile import apply

    text, _ = apply(params, profile)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "params.yaml"
        merged.write_text(text)
        config = load(merged)
    return Plan.from_config(
        config, file_hashes(params, profile), f"{params} + {profile}, merged by pipeline.profile"
    )


def resolve_plan(params: Path, profile: Path, packed: str | None, data: str) -> Plan:
    """The live plan; where ruamel.yaml or jsonschema is missing, the one packed with the data."""
    try:
        return live_plan(params, profile)
    except ModuleNotFoundError as err:
        if packed is None:
            raise SystemExit(
                f"error: {err.name} is not installed here, so {profile} cannot be merged into "
                f"{params} and validated, and {data} holds no packed plan; pack the data where "
                f"both are installed (python -m benchmarks.gpu --pack {DEFAULT_DATA}) and bring "
                "the file along"
            ) from None
        plan = Plan.from_json(packed, f"packed in {data} ({err.name} is not installed here)")
        current = file_hashes(params, profile) if params.is_file() and profile.is_file() else {}
        if current != plan.hashes:
            print(
                f"warning: {params} or {profile} changed since {data} was packed: the plan is "
                "the packed one; pack again to measure the current profile",
                file=sys.stderr,
            )
            plan = replace(plan, source=plan.source + "; stale: the params changed since")
        return plan


def sized(params: Mapping[str, Any], sizes: Sizes) -> dict[str, Any]:
    """The profile's params with the smoke run's model and batch caps applied (FULL: as is)."""
    out = copy.deepcopy(dict(params))
    if sizes.backbone is not None:
        out["model"]["backbone"] = sizes.backbone
    if sizes.width is not None:
        out["model"]["width"] = sizes.width
    if sizes.batch is not None:
        out["pretrain"]["batch_size"] = min(out["pretrain"]["batch_size"], sizes.batch)
        out["finetune"]["batch_size"] = min(out["finetune"]["batch_size"], sizes.batch)
        semi = out["finetune"]["semi"]
        if semi["batch_size"] is not None:
            semi["batch_size"] = min(semi["batch_size"], sizes.batch)
    return out


# ------------------------------------------------------------------------------------------
# Data: Fashion-MNIST packed into one npz (it must travel with the working tree)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """A dataset in the prepared layout: uint8 N x H x W x C images, int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    plan: str | None = None  # the plan packed beside the arrays, if any


def read_idx_folder(folder: Path) -> Images:
    """The four IDX files (gzipped or not) of an MNIST-style folder, by the project's reader."""
    from pipeline.data.formats import read_idx_pair

    found = {}
    for key, name in IDX_FILES.items():
        candidates = [folder / f"{name}.gz", folder / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise SystemExit(
                f"error: {folder} has no {name}[.gz]; point --data at a folder of IDX files"
            )
        found[key] = path
    train = read_idx_pair(found["train_images"], found["train_labels"])
    test = read_idx_pair(found["test_images"], found["test_labels"])
    return Images(*train, *test, source=str(folder))


def pack(source: Path, out: Path, params: Path = PARAMS, profile: Path = PROFILE) -> dict[str, Any]:
    """Write ``source``'s IDX files as one compressed npz (uint8 arrays), with the live plan.

    Why: a GPU machine gets the working tree only (ignored data stays behind) and may lack the
    YAML and schema libraries the plan needs; the npz carries both, under PACK_LIMIT.
    """
    if out.suffix != ".npz":
        raise SystemExit(f"error: --pack {out}: the file name must end in .npz")
    images = read_idx_folder(source)
    plan = live_plan(params, profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.npz")
    np.savez_compressed(
        tmp,
        train_images=images.train_images,
        train_labels=images.train_labels.astype(np.uint8),
        test_images=images.test_images,
        test_labels=images.test_labels.astype(np.uint8),
        plan=np.array(plan.to_json()),
    )
    size = tmp.stat().st_size
    if size > PACK_LIMIT:
        tmp.unlink()
        raise SystemExit(
            f"error: {out} would be {size / 2**20:.1f} MiB, over the {PACK_LIMIT / 2**20:.0f} MiB "
            "that may travel with the working tree; pack a smaller dataset"
        )
    tmp.replace(out)
    return {"path": str(out), "mib": size / 2**20, "train": len(images.train_labels)}


def load_images(data: Path | None, sizes: Sizes) -> Images:
    """``--data`` (an npz from --pack, or a folder of IDX files); without it DEFAULT_DATA, then
    Debian's Fashion-MNIST, and for the smoke run generated images."""
    if data is None:
        if sizes.train_images:
            return generated(sizes.train_images, sizes.test_images)
        data = next((p for p in (DEFAULT_DATA, DEBIAN) if p.exists()), None)
        if data is None:
            raise SystemExit(
                f"error: no data: neither {DEFAULT_DATA} nor {DEBIAN} exists; make it where "
                f"Fashion-MNIST is installed (python -m benchmarks.gpu --pack {DEFAULT_DATA}) "
                "and bring it along, or pass --data"
            )
    if data.is_dir():
        return read_idx_folder(data)
    try:
        with np.load(data, allow_pickle=False) as packed:
            arrays = {key: packed[key] for key in IDX_FILES}
            plan = str(packed["plan"]) if "plan" in packed.files else None
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {data} is not an npz written by --pack ({err})") from None
    return Images(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
        source=str(data),
        plan=plan,
    )


def generated(n_train: int, n_test: int, classes: int = 10, size: int = 28) -> Images:
    """Random 28 x 28 images whose class shows in their brightness (the smoke run's data)."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % classes)
        noise = rng.integers(0, 100, size=(n, size, size, 1))
        images = np.clip(noise + labels[:, None, None, None] * 15, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    return Images(*draw(n_train), *draw(n_test), source="generated")


@dataclass(frozen=True)
class Split:
    """The split stage's sets (pipeline.data.split.make_split with the profile's split
    settings, draw 0) as indices into the training images, and the labeled subsets by name."""

    train: np.ndarray
    val: np.ndarray
    subsets: dict[str, np.ndarray]


def split_of(images: Images, params: Mapping[str, Any]) -> Split:
    from pipeline.data.split import make_split

    settings = params["split"]
    per_class = settings.get("labels_per_class")
    fractions = () if per_class else tuple(sorted(float(f) for f in settings["label_fractions"]))
    budgets = None if per_class is None else tuple(sorted(per_class, key=paths.budget_size))
    made = make_split(
        images.train_images,
        images.train_labels,
        images.test_images,
        float(settings["val_fraction"]),
        float(settings["test_fraction"]),
        fractions,
        settings["seed"],
        labels_per_class=budgets,
    )
    name = paths.budget_key if per_class else paths.fraction_name
    subsets = {name(key): indices for key, indices in made.label_subsets.items()}
    return Split(made.train, made.val, subsets)


def policy_document(images: np.ndarray, params: Mapping[str, Any]) -> dict[str, Any]:
    """What the augment stage's policy.json would hold: the image shape, the training split's
    per-channel statistics and every policy, resolved (the stage's own function)."""
    from pipeline.stages.augment import document_of

    return document_of(images, params["augment"]["policies"], DATASET)


# ------------------------------------------------------------------------------------------
# What every part shares: the data on tensors, the device, Trainers without tracking
# ------------------------------------------------------------------------------------------


class StepClock(Callback):
    """Times a Trainer's training steps after ``warmup`` untimed ones, and its validation.

    The clock stops at the end of the last batch, after a device sync, so queued GPU work is
    counted; steps are not synced one by one (that would take away the CPU-GPU overlap).
    """

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0
        self.images = self.steps = 0
        self.val_seconds = 0.0
        self._val_start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, index: int) -> None:
        if index == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, index: int
    ) -> None:
        if index >= self.warmup:
            self.images += len(batch)
            self.steps += 1
        if index + 1 == trainer.num_training_batches:
            _sync(self.device)
            self.end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, module: Any) -> None:
        _sync(self.device)
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: Any) -> None:
        _sync(self.device)
        self.val_seconds += time.perf_counter() - self._val_start

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class Replay(Callback):
    """Replays the first step's views for the rest of a fit (bench.ReplayedAugment): the model
    step alone, for a method that steps its own optimizers (the GAN) inside a Trainer."""

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self.real = module.augment
        module.augment = bench.ReplayedAugment(self.real)

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, index: int) -> None:
        module.augment.start_step()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, index: int
    ) -> None:
        module.augment.recording = False

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        module.augment = self.real


class Deadline(Callback):
    """Stops a fit at the end of the batch that passes ``seconds`` (the mini-study's box)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self.hit = False

    def on_train_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, index: int
    ) -> None:
        if time.perf_counter() - self.started > self.seconds:
            trainer.should_stop = self.hit = True


@dataclass
class Context:
    """The data on tensors, the device and the settings every part reads."""

    plan: Plan
    params: dict[str, Any]  # the plan's params, sized (Sizes)
    sizes: Sizes
    device: torch.device
    precision: str
    images: torch.Tensor  # every training image, uint8 N x C x H x W, on the CPU
    labels: torch.Tensor  # int64
    split: Split
    document: dict[str, Any]
    root: Path  # Lightning's default_root_dir (nothing is written there: no logger, no ckpt)
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_classes = int(self.labels.max()) + 1

    @property
    def stats(self) -> tuple[list[float], list[float]]:
        return self.document["mean"], self.document["std"]

    @property
    def shape(self) -> tuple[int, int]:
        """(channels, image size)."""
        return self.document["channels"], self.document["image_size"][0]

    def data(
        self,
        sets: Mapping[str, np.ndarray],
        batch: int,
        seed: int,
        max_images: int | None = None,
        train_set: str = "train",
        min_steps: int = 0,
    ) -> Any:
        """The pipeline's SplitData over these index sets (filled here: no prepared files)."""
        from pipeline.data.datamodule import SplitData

        data = SplitData(DATASET, tuple(sets), batch, seed, max_images, train_set, min_steps)
        for name, index in sets.items():
            rows = torch.from_numpy(np.asarray(index, dtype=np.int64))
            data.images[name] = self.images[rows].contiguous()
            data.labels[name] = self.labels[rows]
        data.classes = [str(c) for c in range(self.num_classes)]
        return data

    def pretrain_data(self, batch: int | None = None) -> Any:
        pre = self.params["pretrain"]
        sets = {"train": self.split.train, "val": self.split.val}
        return self.data(sets, batch or pre["batch_size"], pre["seed"], pre["max_images"])

    def trainer(self, callbacks: Sequence[Callback], **options: Any) -> L.Trainer:
        """A Trainer as pipeline/training.make_trainer builds one (accelerator, precision,
        deterministic on the CPU, no sanity check, SplitData's own sampler), without its MLflow
        logger (no MLflow here) and without checkpoints."""
        return L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=1,
            precision=self.precision,
            deterministic=self.device.type != "cuda",
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=self.root,
            callbacks=list(callbacks),
            **options,
        )

    def pretrain_kwargs(self, method: str) -> dict[str, Any]:
        channels, size = self.shape
        return bench.module_kwargs(
            self.params,
            image_size=size,
            channels=channels,
            n_images=len(self.split.train),
            method=method,
            stats=self.stats,
        )

    def normalizer(self, policy: str | None = None) -> Any:
        from pipeline.augment import from_policy_document

        return from_policy_document(self.document, policy)

    def encoder(self) -> torch.nn.Module:
        """A fresh encoder of the profile's model, seeded as the scratch init is."""
        from pipeline.models.backbones import BackboneConfig, build_backbone

        L.seed_everything(self.params["pretrain"]["seed"], verbose=False)
        fields = dict(self.params["model"])
        fields["name"] = fields.pop("backbone")
        channels, size = self.shape
        return build_backbone(BackboneConfig(**fields), channels, size)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read afterwards counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Give the last measurement's GPU memory back and restart the peak count."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    """The most GPU memory tensors held since the last :func:`_free` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------
# 1. The GPU tests
# ------------------------------------------------------------------------------------------


def gpu_test_files(folder: Path = Path("tests")) -> list[str]:
    """The test files that mark GPU tests (``pytest.mark.gpu``), so nothing else is collected:
    the other files import MLflow, Snakemake or DVC, which a GPU machine has not got."""
    return sorted(str(p) for p in folder.glob("test_*.py") if "mark.gpu" in p.read_text())


def gpu_tests(timeout: float) -> dict[str, Any]:
    files = gpu_test_files()
    command = ["python", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    if importlib.util.find_spec("pytest") is None:
        return {"command": " ".join(command), "error": "pytest is not installed here"}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        # Plugins installed beside pytest (hypothesis, xdist, ...) are not needed and may import
        # what a GPU machine lacks.
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *command[1:], f"--junitxml={junit}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        counts = junit_counts(junit) if junit.is_file() else {"error": "no junit report"}
    result = {
        "command": " ".join(command),
        "files": files,
        "returncode": done.returncode,
        "seconds": time.perf_counter() - start,
        **counts,
    }
    if done.returncode not in (0, 5):  # 5: nothing selected
        result["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return result


def junit_counts(report: Path) -> dict[str, Any]:
    """Passed, failed, errors (collection errors too) and skipped, with the failing tests."""
    root = ElementTree.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - skipped,
        "failed": total["failures"],
        "errors": total["errors"],
        "skipped": skipped,
        "failing": failing,
    }


# ------------------------------------------------------------------------------------------
# 2. Throughput
# ------------------------------------------------------------------------------------------


def measured_methods(params: Mapping[str, Any]) -> list[str]:
    """SimCLR and every trained method of the profile's pretrain.methods (byol when listed)."""
    listed = [m for m in params["pretrain"]["methods"] if m in TRAINED]
    return ["simclr", *[m for m in listed if m != "simclr"]]


def lightning_rate(
    ctx: Context, kwargs: dict[str, Any], replay: bool = False, validate: bool = True
) -> dict[str, Any]:
    """Images/s of PretrainModule.training_step in a real Trainer (warm-up, then ``steps``
    timed steps, one round), and the seconds of its validation monitor (kNN and probe)."""
    from pipeline.models.pretrain import PretrainModule

    sizes = ctx.sizes
    data = ctx.pretrain_data()
    batches = min(sizes.warmup + sizes.steps, len(data.train_dataloader()))
    clock = StepClock(min(sizes.warmup, batches - 1), ctx.device)
    L.seed_everything(kwargs["seed"], verbose=False)
    module = PretrainModule(**kwargs)
    trainer = ctx.trainer(
        [clock, *([Replay()] if replay else [])],
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=1.0 if validate else 0,
    )
    _free(ctx.device)
    with bench.GpuUtilization(bench.GpuUtilization.gpu_id(ctx.device)) as utilization:
        trainer.fit(module, datamodule=data)
    peak = _peak_mib(ctx.device)
    del module, trainer
    _free(ctx.device)
    return {
        "img_s": clock.rate,
        "val_s": clock.val_seconds if validate else None,
        "steps": clock.steps,
        "gpu_util_pct": utilization.mean,
        "gpu_util_source": utilization.source,
        "peak_mib": peak,
    }


def throughput(ctx: Context) -> dict[str, Any]:
    from pipeline.methods._registry import IMPLEMENTATIONS

    sizes, device = ctx.sizes, ctx.device
    batch = ctx.params["pretrain"]["batch_size"]
    images = ctx.images[torch.from_numpy(ctx.split.train)]
    timing = (batch, sizes.steps, sizes.rounds, sizes.warmup, device)
    methods: dict[str, dict[str, Any]] = {}
    for method in measured_methods(ctx.params):
        print(f"   {method}", file=sys.stderr, flush=True)
        kwargs = ctx.pretrain_kwargs(method)
        lightning = lightning_rate(ctx, kwargs)
        if hasattr(IMPLEMENTATIONS[method], "training_step"):
            # It steps its own optimizers: only a Trainer runs it, for ours and the ceiling.
            ours, ceiling = lightning, lightning_rate(ctx, kwargs, replay=True, validate=False)
            how = "a Lightning Trainer (the method steps its own optimizers)"
        else:
            ours = bench.measure(bench.ours, images, kwargs, *timing)
            _free(device)
            ceiling = bench.measure(bench.replayed, images, kwargs, *timing)
            how = "the objective step in a loop (indices -> device batch -> objective -> step)"
        _free(device)
        ratio = ours["img_s"] / ceiling["img_s"]
        methods[method] = {
            "ours_img_s": ours["img_s"],
            "ceiling_img_s": ceiling["img_s"],
            "lightning_img_s": lightning["img_s"],
            "lightning_val_s": lightning["val_s"],
            "ratio_to_ceiling": ratio,
            "goal_met": ratio >= GOAL,
            "ours_how": how,
            "gpu_util_ours_pct": ours["gpu_util_pct"],
            "gpu_util_ceiling_pct": ceiling["gpu_util_pct"],
            "gpu_util_lightning_pct": lightning["gpu_util_pct"],
            "gpu_util_source": lightning["gpu_util_source"],
            "lightning_peak_mib": lightning["peak_mib"],
        }
    return {
        "backbone": ctx.params["model"]["backbone"],
        "width": ctx.params["model"]["width"],
        "batch_size": batch,
        "precision": ctx.precision,
        "steps": sizes.steps,
        "rounds": sizes.rounds,
        "warmup_steps": sizes.warmup,
        "goal_ratio": GOAL,
        "ceiling_how": "the same step on one batch whose views are drawn once and replayed "
        "(benchmarks.pretrain.ReplayedAugment): no gathering, no augmentation",
        "lightning_how": "PretrainModule.training_step in a Trainer (probe, schedule, EMA "
        "teacher included), one round; its rate and validation seconds cost the epochs",
        "methods": methods,
        "per_sample": per_sample(ctx, images),
    }


def per_sample(ctx: Context, images: torch.Tensor) -> dict[str, Any]:
    """SimCLR through per-sample torchvision views in DataLoader workers (SimCLR only: its two
    views are what every SSL library's Dataset draws; the other methods have no such baseline)."""
    sizes = ctx.sizes
    if importlib.util.find_spec("torchvision") is None:
        return {"method": "simclr", "skipped": "torchvision is not installed here"}
    kwargs = ctx.pretrain_kwargs("simclr")
    batch = ctx.params["pretrain"]["batch_size"]
    timing = (batch, sizes.steps, sizes.rounds, sizes.warmup, ctx.device, sizes.workers)
    measured = bench.measure(bench.per_sample, images, kwargs, *timing)
    _free(ctx.device)
    return {
        "method": "simclr",
        "img_s": measured["img_s"],
        "workers": sizes.workers,
        "gpu_util_pct": measured["gpu_util_pct"],
    }


# ------------------------------------------------------------------------------------------
# 3. Fine-tuning passes
# ------------------------------------------------------------------------------------------


def finetune_batch(ft: Mapping[str, Any], mode: str) -> int:
    """Labeled images per step, as the stage's _batch_size: semi's own batch in a semi cell."""
    semi = ft["semi"]["batch_size"]
    return semi if mode == "semi" and semi is not None else ft["batch_size"]


def cell_budget(ctx: Context, fraction: str, mode: str) -> tuple[Any, Any]:
    """The SplitData a cell at ``fraction`` trains on (seed 0) and its Budget (the cap)."""
    from pipeline.models.finetune import budget

    ft = ctx.params["finetune"]
    labeled = paths.labeled_set(fraction)
    subset = ctx.split.subsets[fraction]
    batch = finetune_batch(ft, mode)
    sets = {labeled: subset, "val": ctx.split.val}
    data = ctx.data(sets, batch, 0, ft["max_images"], labeled, ft["min_steps_per_epoch"])
    steps = len(data.train_dataloader())
    return data, budget(len(subset), batch, steps, ft["max_passes"], ft["min_steps"])


def finetune_module(
    ctx: Context, fraction: str, mode: str, encoder: torch.nn.Module, data: Any, cap: int, seed: int
) -> tuple[Any, float]:
    """The stage's FinetuneModule for one seed (pipeline/stages/finetune.py's _fit_linear), and
    the seconds its frozen features took (mode linear; 0 otherwise)."""
    from pipeline.models.classifier import LinearClassifier
    from pipeline.models.encoders import encode
    from pipeline.models.finetune import FinetuneModule, Recipe, Unlabeled
    from pipeline.stages.finetune import standardized

    ft, semi = ctx.params["finetune"], ctx.params["finetune"]["semi"]
    classifier = LinearClassifier(encoder, encoder.feature_dim, ctx.num_classes, ft["dropout"])
    features, seconds = None, 0.0
    if mode == "linear":
        start = time.perf_counter()
        encoder.to(ctx.device).eval()
        normalize = ctx.normalizer().to(ctx.device)
        features = {
            n: encode(encoder, normalize, im.to(ctx.device)).cpu() for n, im in data.images.items()
        }
        features = standardized(features, data.train_set)[0]
        encoder.cpu()
        seconds = time.perf_counter() - start
    unlabeled = None
    if mode == "semi":
        # The stage's unlabeled_indices: the training split outside the labeled subset, or
        # all of it at all labels.
        rest = np.setdiff1d(ctx.split.train, ctx.split.subsets[fraction])
        pool = torch.from_numpy(rest if len(rest) else ctx.split.train)
        unlabeled = Unlabeled(
            ctx.images[pool].contiguous(),
            ctx.normalizer(semi["weak_policy"]),
            ctx.normalizer(semi["strong_policy"]),
        )
    recipe = Recipe(
        ft["optimizer"],
        cap,
        seed,
        ft["encoder_lr_scale"],
        ft["l1"],
        ft["label_smoothing"],
        ft["multitask_weight"],
        semi["threshold"],
        semi["unlabeled_ratio"],
        semi["unlabeled_weight"],
    )
    policy = semi["weak_policy"] if mode == "semi" else ft["policy"]
    module = FinetuneModule(
        classifier,
        mode,
        ctx.normalizer(policy),
        ctx.normalizer(),
        recipe,
        features=features,
        unlabeled=unlabeled,
    )
    return module, seconds


def finetune_pass(ctx: Context, fraction: str, mode: str) -> dict[str, Any]:
    """One pass of a cell at ``fraction`` in ``mode``: its steps timed in a Trainer (warm-up,
    then up to finetune_steps steps) and one whole validation."""
    from pipeline import third_party

    data, cap = cell_budget(ctx, fraction, mode)
    sizes = ctx.sizes
    encoder = ctx.encoder()
    module, features_s = finetune_module(ctx, fraction, mode, encoder, data, cap.cap_steps, 0)
    batches = min(cap.steps_per_epoch, sizes.warmup + sizes.finetune_steps)
    clock = StepClock(min(sizes.warmup, batches - 1), ctx.device)
    if mode == "linear":
        third_party.expect_frozen_modules()
    trainer = ctx.trainer([clock], max_epochs=1, limit_train_batches=batches)
    _free(ctx.device)
    trainer.fit(module, datamodule=data)
    step_s = clock.seconds / max(clock.steps, 1)
    peak = _peak_mib(ctx.device)
    del module, trainer
    _free(ctx.device)
    return {
        # The loader's batch: the configured one, or the whole subset where that is smaller.
        "batch_size": min(
            finetune_batch(ctx.params["finetune"], mode), len(data.labels[data.train_set])
        ),
        "steps_per_epoch": cap.steps_per_epoch,
        "max_epochs": cap.max_epochs,
        "step_s": step_s,
        "val_s": clock.val_seconds,
        "pass_s": cap.steps_per_epoch * step_s + clock.val_seconds,
        "features_s": features_s,
        "peak_mib": peak,
    }


def knn_cost(ctx: Context, fraction: str) -> dict[str, Any]:
    """A kNN cell's work: the frozen encoder's features of the labeled subset and validation,
    and the choice of k and temperature on validation (pipeline.models.knn.best_knn)."""
    from pipeline.models.encoders import encode
    from pipeline.models.knn import best_knn

    ft = ctx.params["finetune"]
    encoder = ctx.encoder().to(ctx.device).eval()
    normalize = ctx.normalizer().to(ctx.device)
    subset, val = ctx.split.subsets[fraction], ctx.split.val
    start = time.perf_counter()
    bank = encode(encoder, normalize, ctx.images[torch.from_numpy(subset)].to(ctx.device))
    queries = encode(encoder, normalize, ctx.images[torch.from_numpy(val)].to(ctx.device))
    _sync(ctx.device)
    features_s = time.perf_counter() - start
    best_knn(
        bank,
        ctx.labels[torch.from_numpy(subset)].to(ctx.device),
        queries,
        ctx.labels[torch.from_numpy(val)].to(ctx.device),
        ft["knn"]["ks"],
        ft["knn"]["temperatures"],
        ctx.num_classes,
    )
    _sync(ctx.device)
    del encoder
    _free(ctx.device)
    return {"features_s": features_s, "knn_s": time.perf_counter() - start - features_s}


def finetune_passes(ctx: Context) -> dict[str, Any]:
    """Every label budget of the profile, every mode its cells run there."""
    by_fraction: dict[str, dict[str, Any]] = {}
    fractions = sorted({f for _, _, f in ctx.plan.cells}, key=paths.budget_size)
    for fraction in fractions:
        modes = {m for _, m, f in ctx.plan.cells if f == fraction}
        entry: dict[str, Any] = {"labeled_images": len(ctx.split.subsets[fraction]), "modes": {}}
        for mode in [m for m in TRAINED_MODES if m in modes]:
            print(f"   {fraction} {mode}", file=sys.stderr, flush=True)
            entry["modes"][mode] = finetune_pass(ctx, fraction, mode)
        if "knn" in modes:
            entry["modes"]["knn"] = knn_cost(ctx, fraction)
        by_fraction[fraction] = entry
    return {"timed_steps": ctx.sizes.finetune_steps, "fractions": by_fraction}


# ------------------------------------------------------------------------------------------
# 4. The per-job fixed cost and the extrapolation
# ------------------------------------------------------------------------------------------

_FIXED_COST = """
import json, sys, time
start = time.perf_counter()
import lightning, pipeline.models.pretrain
imported = time.perf_counter()
import torch
cuda = torch.cuda.is_available()
if cuda:
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
ready = time.perf_counter()
data = torch.empty(int(sys.argv[1]), dtype=torch.uint8)
if cuda:
    data = data.to("cuda")
    torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "cuda_init_s": ready - imported,
                  "transfer_s": done - ready if cuda else 0.0}))
"""


def fixed_cost(ctx: Context) -> dict[str, Any]:
    """What every training job pays before its first step, measured in a fresh process: the
    interpreter, importing Lightning and the model code, CUDA init, the training images to the
    device. A real job also opens its MLflow run and reads the prepared arrays from disk: not
    measurable here (no MLflow), so this is a lower bound."""
    size = int(ctx.images[0].numel()) * len(ctx.split.train)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _FIXED_COST, str(size)], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "transfer_mib": size / 2**20, **json.loads(done.stdout)}


def pca_fit_seconds(ctx: Context) -> float:
    """The pca job's fit, as pipeline/stages/pretrain.py's _fit_pca does it (on the CPU)."""
    from pipeline.models.pretrain import PCAEncoder

    start = time.perf_counter()
    normalize = ctx.normalizer()
    train = normalize(ctx.images[torch.from_numpy(ctx.split.train)]).flatten(1)
    components = min(ctx.params["pretrain"]["pca"]["components"], train.shape[1])
    PCAEncoder(train.shape[1], components).fit(train)
    return time.perf_counter() - start


def pretrain_steps(ctx: Context) -> int:
    """Steps in one pretraining epoch: the stage's loader over the training split."""
    return len(ctx.pretrain_data().train_dataloader())


def extrapolate(
    ctx: Context,
    rates: Mapping[str, Any],
    passes: Mapping[str, Any],
    fixed: Mapping[str, Any],
    pca_s: float,
) -> dict[str, Any]:
    """The GPU profile's time, one job after another on this GPU, from the parts measured.

    Pretraining: epochs x (steps x batch / Lightning images/s + the validation monitor) per
    trained method; scratch and pixels one monitor, pca its fit and one monitor. A cell, per
    seed: its cap in epochs x its pass (the upper bound: early stopping ends cells sooner);
    linear adds its frozen features, kNN is features plus the fit. Each job adds the fixed cost.
    Cells are costed with the profile's encoder whatever their init (PCA and pixels features are
    cheaper: an upper bound) and the other stages (download, split, augment, evaluate, report)
    with the fixed cost only (their work is minutes on a CPU, BENCHMARKS.md's pipeline section).
    """
    pre, ft = ctx.params["pretrain"], ctx.params["finetune"]
    epoch_images = pretrain_steps(ctx) * pre["batch_size"]
    methods = rates["methods"]
    monitor_s = methods["simclr"]["lightning_val_s"]
    pretrain_s: dict[str, float] = {}
    for method in pre["methods"]:
        if method in TRAINED and method not in methods:
            raise RuntimeError(f"{method} is trained but its speed was not measured")
        if method in methods:
            rate = methods[method]
            epoch = epoch_images / rate["lightning_img_s"] + rate["lightning_val_s"]
            pretrain_s[method] = pre["epochs"] * epoch
        else:  # a reference encoder: scratch, pixels, pca
            pretrain_s[method] = monitor_s + (pca_s if method == "pca" else 0.0)
    seeds = len(ft["seeds"])
    cells_s: dict[str, float] = {}
    by_mode: dict[str, float] = {}
    for init, mode, fraction in ctx.plan.cells:
        timed = passes["fractions"][fraction]["modes"][mode]
        if mode == "knn":
            seconds = timed["features_s"] + timed["knn_s"]
        else:
            seconds = timed["features_s"] + seeds * timed["max_epochs"] * timed["pass_s"]
        cells_s[f"{init}-{mode}-{fraction}"] = seconds
        by_mode[mode] = by_mode.get(mode, 0.0) + seconds
    fixed_s = ctx.plan.job_count * fixed["seconds"]
    parts = {
        "pretrain": sum(pretrain_s.values()),
        "finetune": sum(cells_s.values()),
        "fixed": fixed_s,
    }
    total = sum(parts.values())
    return {
        "jobs": ctx.plan.jobs,
        "job_count": ctx.plan.job_count,
        "cells": len(ctx.plan.cells),
        "seeds": seeds,
        "epochs": pre["epochs"],
        "epoch_images": epoch_images,
        "fixed_cost_s": fixed["seconds"],
        "parts_s": parts,
        "pretrain_s": pretrain_s,
        "finetune_by_mode_s": by_mode,
        "slowest_cells_s": dict(sorted(cells_s.items(), key=lambda kv: -kv[1])[:5]),
        "total_s": total,
        "total_h": total / 3600,
        "how": extrapolate.__doc__.split("\n\n", 1)[1].strip().replace("\n    ", " "),
    }


# ------------------------------------------------------------------------------------------
# 5. The mini-study
# ------------------------------------------------------------------------------------------


def mini_study(
    ctx: Context, seconds: float, rates: Mapping[str, Any], passes: Mapping[str, Any]
) -> dict[str, Any]:
    """SimCLR for as many epochs as ``seconds`` allow, kNN vs pixels, one cell vs scratch.

    The epochs are chosen up front from the measured rates (the schedule depends on them), after
    setting aside what the kNN and the two fine-tuning cells will take; a Deadline callback stops
    pretraining if it runs over anyway, and the result says so.
    """
    from pipeline.models.knn import best_knn
    from pipeline.models.pretrain import PretrainModule

    pre, ft = ctx.params["pretrain"], ctx.params["finetune"]
    fraction = min(ctx.split.subsets, key=paths.budget_size)
    simclr = rates["methods"]["simclr"]
    epoch_s = pretrain_steps(ctx) * pre["batch_size"] / simclr["lightning_img_s"]
    epoch_s += simclr["lightning_val_s"]
    timed = passes["fractions"].get(fraction, {}).get("modes", {}).get("finetune")
    cell_s = timed["max_epochs"] * timed["pass_s"] if timed else epoch_s
    reserve = 2 * cell_s + 2 * simclr["lightning_val_s"]
    epochs = int(max(1, min(pre["epochs"], (seconds - reserve) // epoch_s)))
    kwargs = {**ctx.pretrain_kwargs("simclr"), "epochs": epochs}
    start = time.perf_counter()
    L.seed_everything(pre["seed"], verbose=False)
    module = PretrainModule(**kwargs)
    deadline = Deadline(max(seconds - reserve, epoch_s) * 1.1)
    trainer = ctx.trainer([deadline], max_epochs=epochs)
    trainer.fit(module, datamodule=ctx.pretrain_data())
    pretrain_s = time.perf_counter() - start
    # kNN on the monitor's terms: its bank of training images, its grid, validation queries.
    monitor = pre["monitor"]
    bank_rows = torch.from_numpy(ctx.split.train[: monitor["knn_max_train"]])
    val_rows = torch.from_numpy(ctx.split.val)
    module.to(ctx.device).eval()
    normalize = ctx.normalizer().to(ctx.device)
    bank, queries = (ctx.images[rows].to(ctx.device) for rows in (bank_rows, val_rows))
    with torch.no_grad():
        features = {
            "simclr": (module.encode(bank), module.encode(queries)),
            "pixels": (normalize(bank).flatten(1), normalize(queries).flatten(1)),
        }
    knn = {}
    for name, (bank_features, query_features) in features.items():
        accuracy, k, t = best_knn(
            bank_features,
            ctx.labels[bank_rows].to(ctx.device),
            query_features,
            ctx.labels[val_rows].to(ctx.device),
            monitor["knn_ks"],
            monitor["knn_temperatures"],
            ctx.num_classes,
        )
        knn[name] = {"val_acc": accuracy, "k": k, "temperature": t}
    history = [{k: round(v, 6) for k, v in row.items()} for row in module.history]
    encoder = module.backbone.cpu()
    del module, trainer
    _free(ctx.device)
    cells = {
        init: finetune_cell(ctx, fraction, weights, ft["seeds"][0])
        for init, weights in (("simclr", encoder), ("scratch", ctx.encoder()))
    }
    return {
        "budget_s": seconds,
        "seconds": time.perf_counter() - start,
        "pretrain_s": pretrain_s,
        "epochs_planned": epochs,
        "epochs_run": len(history),
        "stopped_by_deadline": deadline.hit,
        "history": history,
        "knn": knn,
        "knn_margin": knn["simclr"]["val_acc"] - knn["pixels"]["val_acc"],
        "fraction": fraction,
        "finetune": cells,
        "finetune_margin": cells["simclr"]["val_acc"] - cells["scratch"]["val_acc"],
    }


def finetune_cell(
    ctx: Context, fraction: str, encoder: torch.nn.Module, seed: int
) -> dict[str, Any]:
    """One seed of the cell (init, finetune, ``fraction``) as the stage trains it: the budget's
    cap, early stopping on validation accuracy, the best epoch kept."""
    ft = ctx.params["finetune"]
    data, cap = cell_budget(ctx, fraction, "finetune")
    L.seed_everything(seed, verbose=False)
    data.seed = seed
    encoder.train()  # as the stage loads it: the kNN above left the SimCLR encoder in eval
    module, _ = finetune_module(ctx, fraction, "finetune", encoder, data, cap.cap_steps, seed)
    batches, epochs = ctx.sizes.cell_batches, ctx.sizes.cell_epochs
    limit = {} if batches is None else {"limit_train_batches": min(batches, cap.steps_per_epoch)}
    stopping = EarlyStopping("val_acc", patience=ft["patience"], mode="max")
    start = time.perf_counter()
    max_epochs = cap.max_epochs if epochs is None else min(epochs, cap.max_epochs)
    trainer = ctx.trainer([stopping], max_epochs=max_epochs, **limit)
    trainer.fit(module, datamodule=data)
    result = {
        "val_acc": module.best_acc,
        "best_epoch": module.best_epoch,
        "epochs_run": len(module.history),
        "max_epochs": cap.max_epochs,
        "seconds": time.perf_counter() - start,
    }
    del module, trainer
    _free(ctx.device)
    return result


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


class Recorder:
    """The result document, rewritten after every part; a part's failure is recorded and the
    rest goes on (the parts that need its numbers then record their own error)."""

    def __init__(self, path: Path, result: dict[str, Any]) -> None:
        self.path = path
        self.result = result
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        print(f"== {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except Exception as err:  # recorded, and the next part runs
            traceback.print_exc()
            self.result["errors"][name] = f"{type(err).__name__}: {err}"
        finally:
            self.result["part_seconds"][name] = time.perf_counter() - start
            self.result["seconds"] = self.elapsed
            save_result(self.path, self.result)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def third_party_modules() -> list[str]:
    """The top-level modules outside the standard library that this process has imported: what
    a GPU machine must have for the check (the smoke test also reads it)."""
    ours = {"benchmarks", "pipeline", "tests", "sitecustomize", "__main__", "__mp_main__"}
    names = {  # None: a module marked absent (an import of it fails)
        name.split(".")[0]
        for name, module in sys.modules.items()
        if module is not None and not name.startswith("_")
    }
    return sorted(names - set(sys.stdlib_module_names) - ours)


def run(args: argparse.Namespace, sizes: Sizes) -> dict[str, Any]:
    """Every part, in order; the result document."""
    from pipeline import third_party, training

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(bench.THREADS)
    images = load_images(args.data, sizes)
    plan = resolve_plan(args.params, args.profile, images.plan, str(args.data or images.source))
    params = sized(plan.params, sizes)
    precision = training.precision(params["trainer"]["precision"])
    split = split_of(images, params)
    document = policy_document(images.train_images[split.train], params)
    result: dict[str, Any] = {
        "smoke": args.smoke,
        "complete": False,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "limit_s": sizes.limit,
        "plan": {
            "source": plan.source,
            "methods": list(params["pretrain"]["methods"]),
            "backbone": params["model"]["backbone"],
            "width": params["model"]["width"],
            "job_count": plan.job_count,
        },
        "data": {
            "source": images.source,
            "train": len(split.train),
            "val": len(split.val),
            "subsets": {name: len(index) for name, index in split.subsets.items()},
        },
        "errors": {},
        "part_seconds": {},
        "machine": describe("benchmarks.gpu"),
    }
    recorder = Recorder(args.json, result)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # as make_trainer does
    third_party.ignore_known_warnings()
    with tempfile.TemporaryDirectory() as root:
        ctx = Context(
            plan,
            params,
            sizes,
            device,
            precision,
            torch.from_numpy(images.train_images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(images.train_labels.astype(np.int64)),
            split,
            document,
            Path(root),
        )
        with recorder.part("tests"):
            result["tests"] = gpu_tests(sizes.tests_timeout)
        with recorder.part("fixed_cost"):
            result["fixed_cost"] = fixed_cost(ctx)
        with recorder.part("throughput"):
            result["throughput"] = throughput(ctx)
        with recorder.part("finetune"):
            result["finetune"] = finetune_passes(ctx)
        with recorder.part("extrapolation"):
            pca_s = pca_fit_seconds(ctx)
            result["extrapolation"] = extrapolate(
                ctx, result["throughput"], result["finetune"], result["fixed_cost"], pca_s
            )
            result["extrapolation"]["pca_fit_s"] = pca_s
        with recorder.part("mini_study"):
            left = sizes.limit - recorder.elapsed - 10.0  # 10 s for writing up
            seconds = min(args.budget if args.budget is not None else sizes.budget, left)
            if seconds < (1.0 if args.smoke else 30.0):
                raise RuntimeError(f"only {left:.0f} s of the {sizes.limit:.0f} s limit were left")
            result["mini_study"] = mini_study(
                ctx, seconds, result["throughput"], result["finetune"]
            )
    result["third_party_modules"] = third_party_modules()
    result["complete"] = True
    result["seconds"] = recorder.elapsed
    save_result(args.json, result)
    return result


def publish(result: dict[str, Any], path: Path, smoke: bool) -> None:
    """BENCHMARKS.md from the results (not for a smoke run), and copies into ``$OUT``."""
    from benchmarks import report

    section = "\n".join(report._gpu(result))
    if not smoke and path.resolve() == RESULT.resolve():
        report.main()
    out = os.environ.get("OUT")
    if out:
        shutil.copy(path, Path(out) / path.name)
        (Path(out) / f"{path.stem}.md").write_text(section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help=f"npz from --pack or IDX folder ({DEFAULT_DATA})")
    parser.add_argument("--budget", type=float, help="mini-study seconds (default 180; smoke 4)")
    parser.add_argument("--json", type=Path, help=f"where the result goes ({RESULT})")
    parser.add_argument("--params", type=Path, default=PARAMS)
    parser.add_argument("--profile", type=Path, default=PROFILE)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU, < 1 min")
    parser.add_argument("--pack", type=Path, metavar="NPZ", help="pack --source into NPZ, exit")
    parser.add_argument("--source", type=Path, default=DEBIAN, help="IDX folder for --pack")
    args = parser.parse_args(argv)
    if args.pack is not None:
        packed = pack(args.source, args.pack, args.params, args.profile)
        print(f"wrote {packed['path']}: {packed['mib']:.1f} MiB, {packed['train']} training images")
        return 0
    if args.smoke:
        sizes = SMOKE
        if args.json is None:  # never over the real result
            args.json = Path(tempfile.mkdtemp(prefix="gpu-smoke-")) / "gpu_smoke.json"
        elif args.json.resolve() in (RESULT.resolve(), (ROOT / RESULT).resolve()):
            parser.error(f"a smoke run does not write {RESULT}; pass another --json")
    else:
        sizes = FULL
        args.json = args.json or RESULT
        if not torch.cuda.is_available():
            parser.error(
                "no CUDA device here: the GPU check needs one (--smoke runs it on the CPU)"
            )
    result = run(args, sizes)
    publish(result, args.json, args.smoke)
    print(f"wrote {args.json} in {result['seconds']:.0f} s", file=sys.stderr)
    tests = result.get("tests", {})
    failed = tests.get("failed", 0) + tests.get("errors", 0) + ("error" in tests)
    return 1 if result["errors"] or failed else 0


if __name__ == "__main__":
    sys.exit(main())
