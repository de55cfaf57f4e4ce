"""Training speed on this CPU: precision, channels-last, torch.compile, threads and batch size.

    python -m benchmarks.cpu [--json OUT]

Why: the default study must fit in 15 minutes on a 2-core CPU, and every second saved in a
training step is a second the study can spend on pretraining. Each setting is timed against a
baseline run in the same process (float32, contiguous layout, 2 threads, eager), so the ratios do
not depend on how fast the machine happens to be today:

* one fine-tuning step (the ``model`` of params.yaml with a linear head: forward, cross-entropy,
  backward, AdamW) at several batch sizes, under each layout x precision, with and without
  ``torch.compile`` (whose compile time is recorded: every fine-tuning job is a fresh process);
* one SimCLR step (``PretrainModule.objective`` with BatchAugment views) in float32 and bf16;
* threads: one process with 2 threads against two processes with 1 thread each, side by side;
* equal accuracy: the same seeded fine-tuning run (10 % of Fashion-MNIST's training images,
  600 steps) in float32/contiguous and in the adopted setting, scored on held-out images.

Images/s are the best of ROUNDS rounds after WARMUP untimed steps: interference from other
processes only ever slows a round down.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.machine import describe, save_result

PARAMS = Path("params.yaml")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ROUNDS = 5
WARMUP = 3
STEPS = 20
BATCHES = (64, 128, 256, 512)
ACCURACY_STEPS = 600


def _classifier(backbone: dict[str, Any]) -> Any:
    from pipeline.models.backbones import BackboneConfig, build_backbone
    from pipeline.models.classifier import LinearClassifier

    encoder = build_backbone(BackboneConfig(**backbone), 1, 28)
    return LinearClassifier(encoder, encoder.feature_dim, 10)


def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def finetune_stepper(
    backbone: dict[str, Any], batch: int, channels_last: bool, bf16: bool, compiled: bool = False
) -> tuple[Any, float]:
    """A fine-tuning step to time, and the seconds its first WARMUP steps took (compilation)."""
    torch.manual_seed(0)
    model = _classifier(backbone)
    images, labels = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    forward = torch.compile(model.logits) if compiled else model.logits

    def step() -> None:
        with _autocast(bf16):
            loss = F.cross_entropy(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(WARMUP):
        step()
    return step, time.perf_counter() - start


def interleaved_speed(
    steppers: dict[Any, tuple[Any, int]], rounds: int = ROUNDS, steps: int = STEPS
) -> dict[Any, float]:
    """Best images/s of each ``{key: (step, batch)}``, the rounds interleaved: on a shared
    machine a slow spell then costs every setting alike instead of one of them."""
    best = dict.fromkeys(steppers, 0.0)
    for _ in range(rounds):
        for key, (step, batch) in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[key] = max(best[key], steps * batch / (time.perf_counter() - start))
    return best


def finetune_step_speed(
    backbone: dict[str, Any], batch: int, channels_last: bool, bf16: bool, threads: int = 2
) -> float:
    """Images/s of one setting alone (the 1-thread workers use it)."""
    torch.set_num_threads(threads)
    step, _ = finetune_stepper(backbone, batch, channels_last, bf16)
    return interleaved_speed({0: (step, batch)})[0]


def simclr_stepper(params: Path, bf16: bool) -> tuple[Any, int]:
    """One SimCLR step of the pipeline's own module (two views, loss, backward), and its batch."""
    from benchmarks.pretrain import module_kwargs
    from pipeline.config import load
    from pipeline.models.pretrain import PretrainModule

    torch.manual_seed(0)
    module = PretrainModule(**module_kwargs(params))
    optimizer = torch.optim.AdamW(module.parameters(), 1e-3)
    data = torch.randint(0, 256, (4096, 1, 28, 28), dtype=torch.uint8)
    batch = load(params).pretrain.batch_size
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(0, len(data), (batch,), generator=generator)
        with _autocast(bf16):
            loss = module.objective(data[index], generator)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    return step, batch


def _one_thread_worker(args: tuple[dict, int, bool, bool, Any]) -> None:
    backbone, batch, channels_last, bf16, queue = args
    queue.put(finetune_step_speed(backbone, batch, channels_last, bf16, threads=1))


def two_single_thread_processes(
    backbone: dict, batch: int, channels_last: bool, bf16: bool
) -> float:
    """Summed images/s of two 1-thread processes training side by side (two jobs at once)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(
            target=_one_thread_worker, args=((backbone, batch, channels_last, bf16, queue),)
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    total = sum(queue.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    return total


def equal_accuracy(backbone: dict[str, Any], channels_last: bool, bf16: bool) -> float:
    """Held-out accuracy after a seeded 600-step fine-tuning run on 6,000 training images.

    The data are Debian's Fashion-MNIST files: images 0-5,999 train, 54,000-59,999 score (a fixed
    split of the training file, never the test file). Only the setting differs between calls.
    """
    from pipeline.data.formats import read_idx_pair

    images, labels = read_idx_pair(
        FASHION_MNIST / "train-images-idx3-ubyte.gz", FASHION_MNIST / "train-labels-idx1-ubyte.gz"
    )
    x = torch.from_numpy(images.astype("float32") / 255.0).reshape(-1, 1, 28, 28)
    x = (x - 0.286) / 0.353
    y = torch.from_numpy(labels.astype("int64"))
    train, held = slice(0, 6000), slice(54000, 60000)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = _classifier(backbone)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, ACCURACY_STEPS)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(ACCURACY_STEPS):
        index = torch.randint(0, 6000, (128,), generator=order)
        batch = x[train][index].contiguous(memory_format=layout)
        with _autocast(bf16):
            loss = F.cross_entropy(model.logits(batch).float(), y[train][index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad(), _autocast(bf16):
        predictions = model.logits(x[held].contiguous(memory_format=layout)).argmax(1)
    return float((predictions == y[held]).float().mean())


def run(params: Path = PARAMS, compile_too: bool = True) -> dict[str, Any]:
    from pipeline.config import load
    from pipeline.stages.pretrain import backbone_fields

    torch.set_num_threads(2)
    backbone = backbone_fields(load(params))
    settings = [
        (batch, channels_last, bf16, False)
        for batch in BATCHES
        for channels_last in (False, True)
        for bf16 in (False, True)
    ]
    if compile_too:
        settings += [(128, True, False, True), (128, True, True, True)]
    steppers, first_steps = {}, {}
    for setting in settings:
        step, first_steps[setting] = finetune_stepper(backbone, *setting[:3], compiled=setting[3])
        steppers[setting] = (step, setting[0])
    speed = interleaved_speed(steppers)
    baseline = speed[(128, False, False, False)]
    rows = [
        {
            "batch": b,
            "channels_last": c,
            "bf16": f,
            "compiled": k,
            "images_per_s": speed[(b, c, f, k)],
            "first_steps_s": first_steps[(b, c, f, k)],
            "ratio": speed[(b, c, f, k)] / baseline,
        }
        for b, c, f, k in settings
    ]
    threads = {
        "one_process_2_threads": speed[(128, True, True, False)],
        "two_processes_1_thread": two_single_thread_processes(backbone, 128, True, True),
    }
    simclr = interleaved_speed(
        {"float32": simclr_stepper(params, False), "bf16": simclr_stepper(params, True)},
        steps=STEPS // 2,
    )
    accuracy = {
        "float32_contiguous": equal_accuracy(backbone, False, False),
        "bf16_channels_last": equal_accuracy(backbone, True, True),
    }
    return {
        "backbone": backbone,
        "finetune_step": rows,
        "threads": threads,
        "simclr": simclr,
        "accuracy": accuracy,
        "accuracy_steps": ACCURACY_STEPS,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--params", type=Path, default=PARAMS)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    result = {
        "machine": describe("benchmarks.cpu"),
        **run(args.params, compile_too=not args.no_compile),
    }
    save_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
