"""SimCLR pretraining throughput: on-device batched views vs a per-sample DataLoader.

    python -m benchmarks.pretrain [--steps N] [--json OUT]

Why: benchmarks/augment.py shows that BatchAugment augments much faster than per-sample
transforms, but what a user waits for is a whole training step (two views, encoder, projection
head, NT-Xent, backward, optimizer). This measures that end to end, in one process, with the
default model of params.yaml (``model``: backbone and width), ``pretrain.batch_size``, the
optimizer of ``pretrain.optimizer``, ``pretrain.simclr``'s loss options and the policy SimCLR
trains with (``augment.policies.ssl``):

* ours:       the pipeline's own path. The whole uint8 training set is one tensor on the device;
              each step gathers a batch of random indices from it and calls
              ``PretrainModule.objective`` (two BatchAugment views, backbone, head, nt_xent), then
              backward and optimizer.step; torch.set_num_threads(2).
* per-sample: the way popular SSL libraries load data without DALI: a Dataset whose
              __getitem__ applies torchvision.transforms.v2 twice (two views) to one image, in a
              DataLoader with 2 persistent workers; the same backbone, head, loss and optimizer in
              the main process.

For context, the same training step on one fixed, precomputed pair of views (no loading, no
augmentation) is timed too: it bounds both contenders, so it says how much of a step an input
pipeline can win back at all. ``replayed`` is that ceiling for any method (every view a step
draws is recorded once and replayed); benchmarks/gpu.py times every method with it and ``ours``.

Images/s count each source image once, although it yields two views. Every number is the best
of ROUNDS rounds of N steps after WARMUP untimed steps (worker start-up, lazy init, allocator
warm-up): the machine may be shared, and interference only ever slows a round down.

ResNet-18 (width 32, batch 256) is measured too, on the "ours" path only and for information:
the CPU is too slow for it to matter there. With CUDA, "ours" and the per-sample baseline train
on the GPU under bf16 autocast (as the pretrain stage does), the GPU's name and its mean
utilization during each timed loop are recorded, and ResNet-18 width 64 at batch 512 is added.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks import augment as augment_bench
from benchmarks.machine import describe, save_result

PARAMS = Path("params.yaml")
THREADS = 2
WORKERS = 2
ROUNDS = 3
WARMUP = 2
TARGET = 3.0  # ours / per-sample, from the issue
RESNET_CPU = {"width": 32, "batch_size": 256, "steps": 5}  # every run, on its device
RESNET_GPU = {"width": 64, "batch_size": 512, "steps": 20}  # CUDA runs only
MEAN, STD = augment_bench.MEAN, augment_bench.STD  # speed does not depend on the statistics
NUM_CLASSES = 10  # only sizes the (unused) linear probe


# ------------------------------------------------------------------------------------------
# Configuration: the module the pretrain stage would build
# ------------------------------------------------------------------------------------------


def module_kwargs(
    params: Path | Mapping[str, Any] = PARAMS,
    backbone: str | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    image_size: int = 28,
    channels: int = 1,
    n_images: int = 60000,
    method: str = "simclr",
    stats: tuple[list[float], list[float]] | None = None,
) -> dict[str, Any]:
    """PretrainModule(method=...) arguments, built as pipeline/stages/pretrain.py does.

    Why not call the stage's ``hparams_for``: it reads policy.json and the statistics from the
    augment stage's outputs, which a benchmark must not depend on. Everything else comes from
    the params (a params.yaml path, or params already validated with their defaults filled in,
    such as ``Config.raw`` of a merged profile), so a change there (policy, loss options,
    optimizer) is what gets measured; ``backbone``/``width``/``batch_size`` override the model
    and batch, ``stats`` the (mean, std) per channel (speed does not depend on them).
    """
    from pipeline.augment import resolve_policy

    raw = _raw_params(params)
    pre = raw["pretrain"]
    fields = dict(raw["model"])  # the stage's backbone_fields: ``backbone`` is the name
    fields["name"] = fields.pop("backbone")
    if backbone is not None:
        fields["name"] = backbone
    if width is not None:
        fields["width"] = width
    batch = batch_size or pre["batch_size"]
    options = pre[method]
    mean, std = stats or ([MEAN] * channels, [STD] * channels)
    return {
        "method": method,
        "backbone": fields,
        "in_channels": channels,
        "image_size": image_size,
        "num_classes": NUM_CLASSES,
        # The method's own policy, else the common one (PretrainConfig.policy_for).
        "policy": resolve_policy(raw["augment"]["policies"][options.get("policy", pre["policy"])]),
        "mean": list(mean),
        "std": list(std),
        "options": {k: v for k, v in options.items() if k != "policy"},
        "optimizer": pre["optimizer"],
        "epochs": pre["epochs"],
        "warmup_epochs": float(pre["warmup_epochs"]),
        "steps_per_epoch": max(1, n_images // batch),
        "seed": pre["seed"],
        "monitor": pre["monitor"],
    }


def _raw_params(params: Path | Mapping[str, Any]) -> Mapping[str, Any]:
    """Validated params with defaults filled in: read from a params file, or as given."""
    if isinstance(params, Mapping):
        return params
    from pipeline.config import load

    return load(params).raw


def _build(kwargs: dict[str, Any], device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    """A fresh PretrainModule and the optimizer of params.yaml over its backbone and heads.

    The linear probe is left out of the optimizer on both paths: the stage trains it on the
    side, and it is not part of what is compared here.
    """
    from pipeline.models.optim import build_optimizer
    from pipeline.models.pretrain import PretrainModule

    torch.manual_seed(kwargs["seed"])  # same initial weights for both contenders
    module = PretrainModule(**kwargs).to(device).train()
    opt = kwargs["optimizer"]
    # The encoder and the method's heads; not the probe, nor a teacher (no gradient: it moves
    # by EMA, see _after_step).
    trained = [
        p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("probe.")
    ]
    optimizer = build_optimizer(
        [{"params": trained}],
        opt["name"],
        opt["lr"],
        opt["weight_decay"],
        opt["momentum"],
        opt["nesterov"],
    )
    return module, optimizer


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (the stage's ``bf16-mixed``), full fp32 on the CPU (``32-true``)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timed round ends when its steps have really run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


class GpuUtilization(AbstractContextManager["GpuUtilization"]):
    """Samples the GPU's utilization every ``interval`` s in a background thread.

    Why: images/s alone does not say whether the GPU is starved by the input pipeline; the
    mean utilization during the timed loop does. It reads NVML through pynvml (the ``[gpu]``
    extra, nvidia-ml-py: no process per sample) when that is installed and knows the GPU, else
    ``nvidia-smi``; with neither (or on a CPU run) it records nothing and ``mean`` is None.
    ``source`` says which one sampled.
    """

    def __init__(self, gpu: str | None, interval: float = 0.2) -> None:
        self.gpu = gpu
        self.interval = interval
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def gpu_id(device: torch.device) -> str | None:
        """nvidia-smi's id of ``device``: its UUID, so CUDA_VISIBLE_DEVICES cannot mislead."""
        if device.type != "cuda":
            return None
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"

    def _nvml(self) -> Callable[[], float | None] | None:
        """A reader of the GPU's utilization through pynvml, or None where it cannot be had."""
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(str(self.gpu).encode())
        except Exception:  # not installed, no driver, an id NVML does not know: nvidia-smi
            return None

        def read() -> float | None:
            try:
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                return None  # not supported under MIG, say: skip the sample

        return read

    def _smi(self) -> float | None:
        command = [
            "nvidia-smi",
            f"--id={self.gpu}",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
        ]
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None  # "[N/A]" under MIG, an unknown id, a slow driver: skip the sample

    def _sample(self, read: Callable[[], float | None]) -> None:
        while not self._stop.is_set():
            value = read()
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuUtilization:
        if self.gpu is None:
            return self
        read = self._nvml()
        self.source = "nvml" if read is not None else None
        if read is None and shutil.which("nvidia-smi"):
            read, self.source = self._smi, "nvidia-smi"
        if read is not None:
            self._thread = threading.Thread(target=self._sample, args=(read,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def time_steps(
    step: Callable[[], int], steps: int, rounds: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times untimed, then ``rounds`` x ``steps`` times, timed.

    Returns the best round's source images/s and, on CUDA, the mean GPU utilization over all
    timed rounds. ``step`` returns how many source images it consumed.
    """
    for _ in range(warmup):
        step()
    _sync(device)
    best = 0.0
    with GpuUtilization(GpuUtilization.gpu_id(device)) as utilization:
        for _ in range(rounds):
            start = time.perf_counter()
            done = sum(step() for _ in range(steps))
            _sync(device)
            best = max(best, done / (time.perf_counter() - start))
    return {"img_s": best, "gpu_util_pct": utilization.mean}


def _index_batches(
    n: int, batch_size: int, device: torch.device, seed: int
) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches, one permutation per epoch, as the stage's sampler does."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch size {batch_size} does not fit {n} images")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size].to(device)


@dataclass(frozen=True)
class Bench:
    """What every contender starts from: a fresh module and its optimizer (same seed, same
    initial weights), the source images, the module's arguments, the batch size, the device
    and the DataLoader workers of a per-sample contender."""

    module: Any
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    kwargs: dict[str, Any]
    batch_size: int
    device: torch.device
    workers: int = WORKERS


#: A contender: from a Bench, a context that yields its training step (which returns how many
#: source images it consumed) and releases what the step holds (workers) when timing ends.
Contender = Callable[[Bench], AbstractContextManager[Callable[[], int]]]


def measure(
    contender: Contender,
    images: torch.Tensor,
    kwargs: dict[str, Any],
    batch_size: int,
    steps: int,
    rounds: int = ROUNDS,
    warmup: int = WARMUP,
    device: torch.device | None = None,
    workers: int = WORKERS,
) -> dict[str, Any]:
    """Time ``contender``'s step on a fresh module (see :func:`time_steps` for the numbers).

    Why one function: every contender must start from the same module, optimizer and timing
    loop, so the numbers differ only in how the views reach the model.
    """
    device = device or torch.device("cpu")
    module, optimizer = _build(kwargs, device)
    bench = Bench(module, optimizer, images, kwargs, batch_size, device, workers)
    with contender(bench) as step:
        return time_steps(step, steps, rounds, warmup, device)


# ------------------------------------------------------------------------------------------
# The two contenders
# ------------------------------------------------------------------------------------------


@contextmanager
def ours(bench: Bench) -> Iterator[Callable[[], int]]:
    """The pipeline's path: uint8 data on the device, ``PretrainModule.objective`` per step.

    Any method with Lightning's automatic optimization runs this way (its objective is the
    whole step); a method that steps its own optimizers (the GAN) needs a Trainer.
    """
    device, seed = bench.device, bench.kwargs["seed"]
    data = bench.images.to(device)
    indices = _index_batches(data.shape[0], bench.batch_size, device, seed)
    count = 0

    def step() -> int:
        nonlocal count
        batch = data[next(indices)]
        _objective_step(bench, batch, _step_generator(device, seed, count), count)
        count += 1
        return batch.shape[0]

    yield step


def _step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """A generator per step seeded by (seed, step), like PretrainModule._generator."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def _objective_step(
    bench: Bench, batch: torch.Tensor, generator: torch.Generator, count: int
) -> None:
    """What PretrainModule.training_step does for a method with automatic optimization, minus
    the online probe: the objective under the stage's precision, backward, optimizer step, and
    the teacher's EMA move when the method has one (BYOL)."""
    with _autocast(bench.device):
        loss, _, _ = bench.module.objective(batch, generator)
    bench.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    bench.optimizer.step()
    _after_step(bench.module, count)


def _after_step(module: Any, step: int) -> None:
    """Move a method's teacher towards the student after optimizer step ``step`` (0-based), as
    PretrainModule.on_train_batch_end does inside a Trainer; nothing for a method without one."""
    if len(getattr(module, "teacher", ())):
        module.update_teacher(module.momentum(step))


class ReplayedAugment(torch.nn.Module):
    """Stands in for a module's ``augment``: while ``recording`` it draws real views and keeps
    them; afterwards every step gets the recorded views back, in the order it asks for them.

    Why: with it in place, a training step costs the model's work alone, however many views
    the method draws and wherever it draws them (the objective, or its own training_step), so
    it is the ceiling of every method without a method-specific rewrite of its step.
    """

    def __init__(self, real: torch.nn.Module) -> None:
        super().__init__()
        self.real = real
        self.recording = True
        self.views: list[torch.Tensor] = []
        self.position = 0

    def start_step(self) -> None:
        self.position = 0

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.recording:
            view = self.real(images, generator)
            self.views.append(view)
            return view
        view = self.views[self.position % len(self.views)]
        self.position += 1
        return view


@contextmanager
def replayed(bench: Bench) -> Iterator[Callable[[], int]]:
    """The model step alone, for any method with automatic optimization: ``ours`` on one fixed
    batch whose views (every augmentation the step draws) are recorded once and replayed."""
    module, device, seed = bench.module, bench.device, bench.kwargs["seed"]
    batch = bench.images[: bench.batch_size].to(device)
    real = module.augment
    replay = ReplayedAugment(real)
    module.augment = replay
    count = 0

    def step() -> int:
        nonlocal count
        replay.start_step()
        _objective_step(bench, batch, _step_generator(device, seed, count), count)
        replay.recording = False
        count += 1
        return batch.shape[0]

    try:
        yield step
    finally:
        module.augment = real


def _train_on_views(
    module: Any, optimizer: torch.optim.Optimizer, views: torch.Tensor, options: dict[str, Any]
) -> None:
    """One SimCLR step on ready-made views [first; second]: what objective does after augmenting.

    Written out (rather than calling objective) because the views come from elsewhere; the
    lines are those of ``PretrainModule.objective``, so the model work is identical.
    """
    from pipeline.models.losses import nt_xent

    with _autocast(views.device):
        features = module.backbone(module.to_model_layout(views))
        z1, z2 = module.head(features).float().chunk(2)
        loss = nt_xent(z1, z2, options["temperature"], options["normalization"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@contextmanager
def model_only(bench: Bench) -> Iterator[Callable[[], int]]:
    """The same training step on one fixed pair of views: no data loading, no augmentation.

    Why: it is the ceiling both contenders share. If the model step alone is not 3x faster
    than the per-sample pipeline, no input pipeline can make ours 3x faster (Amdahl).
    """
    module = bench.module
    batch = bench.images[: bench.batch_size].to(bench.device)
    generator = torch.Generator(device=bench.device).manual_seed(bench.kwargs["seed"])
    with torch.no_grad():
        views = torch.cat([module.augment(batch, generator), module.augment(batch, generator)])

    def step() -> int:
        _train_on_views(module, bench.optimizer, views, bench.kwargs["options"])
        return batch.shape[0]

    yield step


class TwoViewDataset(Dataset):
    """One image in, two independently augmented views out, as SimCLR-style Datasets do."""

    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


def torchvision_views(
    policy: dict[str, dict[str, Any]], channels: int, size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The policy as per-sample torchvision.transforms.v2, built by benchmarks/augment.py.

    Why reuse it: both benchmarks must mean the same thing by "the SSL policy in torchvision".
    That builder reads the module-level ``SSL_POLICY``; it is set to ``policy`` for the call
    (the returned Compose keeps its own copy of every option) and restored afterwards.
    """
    saved = dict(augment_bench.SSL_POLICY)
    augment_bench.SSL_POLICY.clear()
    augment_bench.SSL_POLICY.update(policy)
    try:
        return augment_bench.torchvision_pipeline(channels, size)
    finally:
        augment_bench.SSL_POLICY.clear()
        augment_bench.SSL_POLICY.update(saved)


@contextmanager
def per_sample(bench: Bench) -> Iterator[Callable[[], int]]:
    """Per-sample torchvision views in DataLoader workers; model, loss, optimizer as ours."""
    images, kwargs, device = bench.images, bench.kwargs, bench.device
    transform = torchvision_views(kwargs["policy"], images.shape[1], images.shape[-1])
    loader = DataLoader(
        TwoViewDataset(images, transform),
        batch_size=bench.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=bench.workers,
        persistent_workers=bench.workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(kwargs["seed"]),
    )

    def endless() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    source = endless()

    def step() -> int:
        first, second = (v.to(device, non_blocking=True) for v in next(source))
        views = torch.cat([first, second])
        _train_on_views(bench.module, bench.optimizer, views, kwargs["options"])
        return first.shape[0]

    try:
        yield step
    finally:
        source.close()  # the loader and its persistent workers go away with this frame


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def _default_batch(params: Path) -> int:
    from pipeline.config import load

    return load(params).pretrain.batch_size


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(
    steps: int,
    params: Path = PARAMS,
    images: torch.Tensor | None = None,
    data: str | None = None,
    batch_size: int | None = None,
    rounds: int = ROUNDS,
    warmup: int = WARMUP,
    resnets: list[dict[str, int]] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Measure both contenders, the model-only ceiling and ResNet-18 on ours; the JSON document.

    ``images``/``batch_size``/``resnets`` exist so tests can run the real thing on small data;
    by default: Fashion-MNIST (or random data of its shape), params.yaml's batch size, and
    RESNET_CPU (plus RESNET_GPU with CUDA). ResNet-18 runs are one round after one warm-up step:
    they are for information and slow on a CPU.
    """
    torch.set_num_threads(THREADS)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if images is None:
        images, data = augment_bench.load_images()
    batch = batch_size or _default_batch(params)
    kwargs = module_kwargs(params, batch_size=batch, n_images=len(images))
    timed = {
        name: measure(contender, images, kwargs, batch, steps, rounds, warmup, device)
        for name, contender in (
            ("ours", ours),
            ("per_sample", per_sample),
            ("model_only", model_only),
        )
    }
    result: dict[str, Any] = {
        "ours_img_s": timed["ours"]["img_s"],
        "per_sample_img_s": timed["per_sample"]["img_s"],
        "ratio": timed["ours"]["img_s"] / timed["per_sample"]["img_s"],
        "target_ratio": TARGET,
        "model_only_img_s": timed["model_only"]["img_s"],
        "backbone": kwargs["backbone"]["name"],
        "width": kwargs["backbone"]["width"],
        "batch_size": batch,
        "steps": steps,
        "rounds": rounds,
        "warmup_steps": warmup,
        "threads": THREADS,
        "workers": WORKERS,
        "device": _device_name(device),
        "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        "gpu_util_ours_pct": timed["ours"]["gpu_util_pct"],
        "gpu_util_per_sample_pct": timed["per_sample"]["gpu_util_pct"],
        "optimizer": kwargs["optimizer"]["name"],
        "lr": kwargs["optimizer"]["lr"],
        "simclr": kwargs["options"],
        "data": data or "given",
        "torch": torch.__version__,
        "policy": kwargs["policy"],
        "resnet18": [],
        "machine": describe("benchmarks.pretrain"),
    }
    if resnets is None:
        resnets = [RESNET_CPU, RESNET_GPU] if device.type == "cuda" else [RESNET_CPU]
    for config in resnets:
        width, size = config["width"], config["batch_size"]
        measured = measure(
            ours,
            images,
            module_kwargs(params, "resnet18", width, size, n_images=len(images)),
            size,
            config["steps"],
            1,
            1,
            device,
        )
        result[f"resnet18_w{width}_img_s"] = measured["img_s"]
        result["resnet18"].append({**config, "rounds": 1, "warmup_steps": 1, **measured})
    for key, value in result.items():
        if key.endswith("_img_s") and not (math.isfinite(value) and value > 0):
            raise RuntimeError(f"{key} = {value}: the measurement failed")
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"data: {result['data']}, {result['device']} ({result['precision']}), best of "
        f"{result['rounds']} rounds of {result['steps']} steps, {result['threads']} threads / "
        f"{result['workers']} DataLoader workers"
    )
    model = f"{result['backbone']} w{result['width']} b{result['batch_size']}"
    rows = [
        ("ours (on-device BatchAugment)", model, result["ours_img_s"], result["gpu_util_ours_pct"]),
        (
            "per-sample torchvision, DataLoader",
            model,
            result["per_sample_img_s"],
            result["gpu_util_per_sample_pct"],
        ),
        ("model step only (views precomputed)", model, result["model_only_img_s"], None),
    ]
    for run_ in result["resnet18"]:
        rows.append(
            (
                "ours",
                f"resnet18 w{run_['width']} b{run_['batch_size']}",
                run_["img_s"],
                run_["gpu_util_pct"],
            )
        )
    print(f"{'method':<38}{'model':<22}{'images/s':>10}{'GPU util %':>12}")
    for name, model_, value, util in rows:
        gpu = "" if util is None else f"{util:.0f}"
        print(f"{name:<38}{model_:<22}{value:>10,.0f}{gpu:>12}")
    print(f"ratio ours / per-sample: {result['ratio']:.2f}x (target >= {TARGET:g}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and method")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--params", type=Path, default=PARAMS, help="params file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    result = run(args.steps, args.params)
    print_table(result)
    save_result(args.json, result)


if __name__ == "__main__":
    main()
