"""Throughput of BatchAugment vs per-sample torchvision transforms vs kornia.augmentation.

    python -m benchmarks.augment [--batches N] [--json OUT]

Why: the pretraining loop is input-bound when every image goes through Python transforms one at
a time. This measures, on this machine and with the SSL policy of params.yaml
(augment.policies.ssl, the one pretraining uses):

* batched:    BatchAugment on uint8 batches of 512, one process, torch.set_num_threads(2);
* per-sample: torchvision.transforms.v2 on each image inside a DataLoader (num_workers=2,
              batch 512), i.e. the usual way to augment;
* kornia:     kornia.augmentation.AugmentationSequential with the same policy, same batches,
              same process and threads as "batched".

Fashion-MNIST images come from Debian's dataset package when installed, else random uint8 data
of the same shape. CIFAR-shaped (32x32x3) numbers use random data and cover batched and kornia.
All numbers are steady-state images/s, best of ROUNDS rounds: the first batch (worker start-up,
lazy init) is not timed.
"""

from __future__ import annotations

import argparse
import gzip
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.machine import describe, save_result
from pipeline.augment import BatchAugment

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
BATCH = 512
THREADS = 2
ROUNDS = 3
PARAMS = Path("params.yaml")


def ssl_policy(params: Path = PARAMS) -> dict[str, dict[str, Any]]:
    """The pretraining policy as configured (augment.policies.ssl), defaults filled in."""
    from pipeline.augment import resolve_policy
    from pipeline.config import load

    return resolve_policy(load(params).augment.policies["ssl"])


SSL_POLICY: dict[str, dict[str, Any]] = {}  # set by run() from params.yaml
# Dataset statistics are irrelevant to speed; any fixed values will do.
MEAN, STD = 0.286, 0.353


def load_images() -> tuple[torch.Tensor, str]:
    """60000 x 1 x 28 x 28 uint8: real Fashion-MNIST if installed, random data otherwise."""
    if FASHION_MNIST.is_file():
        raw = gzip.decompress(FASHION_MNIST.read_bytes())
        images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
        return torch.from_numpy(images.copy()), "fashion-mnist"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return images, "random uint8"


def random_cifar_like(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def batches(images: torch.Tensor, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of BATCH images, like a DataLoader without workers."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0] - BATCH + 1, BATCH):
            yield images[order[start : start + BATCH]]


def images_per_second(step: Callable[[], int], n_batches: int) -> float:
    """Run ``step`` once untimed (warm-up), then ROUNDS x ``n_batches`` times.

    Returns the images/s of the best round: the machine is shared, and interference only ever
    slows a round down, so the fastest round is the least disturbed estimate (as timeit does).
    """
    step()
    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        done = sum(step() for _ in range(n_batches))
        best = max(best, done / (time.perf_counter() - start))
    return best


# ------------------------------------------------------------------------------------------
# The three contenders
# ------------------------------------------------------------------------------------------


def bench_batched(images: torch.Tensor, n_batches: int) -> float:
    channels = images.shape[1]
    augment = BatchAugment(
        SSL_POLICY, tuple(images.shape[-2:]), channels, [MEAN] * channels, [STD] * channels
    )
    source = batches(images)
    generator = torch.Generator().manual_seed(0)

    def step() -> int:
        return augment(next(source), generator).shape[0]

    return images_per_second(step, n_batches)


def kornia_pipeline(channels: int, size: int) -> torch.nn.Module:
    """The SSL policy as kornia.augmentation; saturation/hue/grayscale only for RGB, as ours."""
    import kornia.augmentation as K

    policy = SSL_POLICY
    rgb = channels == 3
    make = {
        "random_resized_crop": lambda o: K.RandomResizedCrop(
            (size, size),
            scale=tuple(o["scale"]),
            ratio=tuple(o["ratio"]),
            p=o["p"],
            cropping_mode="resample",
        ),
        "hflip": lambda o: K.RandomHorizontalFlip(p=o["p"]),
        "vflip": lambda o: K.RandomVerticalFlip(p=o["p"]),
        "rotation": lambda o: K.RandomRotation(float(o["degrees"]), p=o["p"]),
        "affine": lambda o: K.RandomAffine(
            float(o["degrees"]),
            translate=tuple(o["translate"]),
            scale=tuple(o["scale"]),
            p=o["p"],
        ),
        "color_jitter": lambda o: K.ColorJitter(
            o["brightness"],
            o["contrast"],
            o["saturation"] if rgb else 0.0,
            o["hue"] if rgb else 0.0,
            p=o["p"],
        ),
        "grayscale": lambda o: K.RandomGrayscale(p=o["p"]) if rgb else None,
        "gaussian_blur": lambda o: K.RandomGaussianBlur(
            o["kernel_size"], tuple(o["sigma"]), p=o["p"]
        ),
        "gaussian_noise": lambda o: K.RandomGaussianNoise(std=o["std"], p=o["p"]),
        "random_erasing": lambda o: K.RandomErasing(
            scale=tuple(o["scale"]), ratio=tuple(o["ratio"]), value=o["value"], p=o["p"]
        ),
    }
    stages = [make[name](opts) for name, opts in policy.items()]
    stages = [stage for stage in stages if stage is not None]
    return K.AugmentationSequential(*stages)


def bench_kornia(images: torch.Tensor, n_batches: int) -> float:
    channels, size = images.shape[1], images.shape[-1]
    augment = kornia_pipeline(channels, size)
    source = batches(images)

    def step() -> int:
        out = augment(next(source).float() / 255)
        return ((out - MEAN) / STD).shape[0]

    return images_per_second(step, n_batches)


def torchvision_pipeline(channels: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SSL policy as torchvision.transforms.v2, one image at a time.

    Transforms without a ``p`` argument are wrapped in RandomApply. ToDtype comes before
    GaussianNoise because torchvision's noise only accepts float images.
    """
    from torchvision.transforms import v2

    policy = SSL_POLICY
    rgb = channels == 3

    def maybe(transform: Any, p: float) -> Any:
        return v2.RandomApply([transform], p=p)

    make = {
        "random_resized_crop": lambda o: maybe(
            v2.RandomResizedCrop(size, scale=tuple(o["scale"]), ratio=tuple(o["ratio"])), o["p"]
        ),
        "hflip": lambda o: v2.RandomHorizontalFlip(o["p"]),
        "vflip": lambda o: v2.RandomVerticalFlip(o["p"]),
        "rotation": lambda o: maybe(v2.RandomRotation(o["degrees"]), o["p"]),
        "affine": lambda o: maybe(
            v2.RandomAffine(o["degrees"], translate=tuple(o["translate"]), scale=tuple(o["scale"])),
            o["p"],
        ),
        "color_jitter": lambda o: maybe(
            v2.ColorJitter(
                o["brightness"],
                o["contrast"],
                o["saturation"] if rgb else 0.0,
                o["hue"] if rgb else 0.0,
            ),
            o["p"],
        ),
        "grayscale": lambda o: v2.RandomGrayscale(o["p"]) if rgb else None,
        "gaussian_blur": lambda o: maybe(
            v2.GaussianBlur(o["kernel_size"], sigma=tuple(o["sigma"])), o["p"]
        ),
        "gaussian_noise": lambda o: maybe(v2.GaussianNoise(sigma=o["std"]), o["p"]),
        "random_erasing": lambda o: v2.RandomErasing(
            o["p"], scale=tuple(o["scale"]), ratio=tuple(o["ratio"]), value=o["value"]
        ),
    }
    # torchvision's noise and erasing want float images: convert just before the first of them.
    float_from = next(
        (i for i, name in enumerate(policy) if name in ("gaussian_noise", "random_erasing")),
        len(policy),
    )
    stages = []
    for i, (name, opts) in enumerate(policy.items()):
        if i == float_from:
            stages.append(v2.ToDtype(torch.float32, scale=True))
        stage = make[name](opts)
        if stage is not None:
            stages.append(stage)
    if float_from == len(policy):
        stages.append(v2.ToDtype(torch.float32, scale=True))
    stages.append(v2.Normalize([MEAN] * channels, [STD] * channels))
    return v2.Compose(stages)


class PerSampleDataset(Dataset):
    """Applies the torchvision pipeline in __getitem__, as a typical training Dataset does."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.transform = torchvision_pipeline(images.shape[1], images.shape[-1])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index])


def bench_per_sample(images: torch.Tensor, n_batches: int) -> float:
    loader = DataLoader(
        PerSampleDataset(images),
        batch_size=BATCH,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )

    def endless() -> Iterator[torch.Tensor]:
        while True:
            yield from loader

    source = endless()

    def step() -> int:
        return next(source).shape[0]

    try:
        return images_per_second(step, n_batches)
    finally:
        source.close()  # the loader and its persistent workers go away with this frame


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def run(n_batches: int, params: Path = PARAMS) -> dict[str, Any]:
    SSL_POLICY.clear()
    SSL_POLICY.update(ssl_policy(params))
    torch.set_num_threads(THREADS)
    fashion, data = load_images()
    cifar = random_cifar_like(BATCH * 8)
    with torch.inference_mode():
        result: dict[str, Any] = {
            "batched_img_s": bench_batched(fashion, n_batches),
            "kornia_img_s": bench_kornia(fashion, n_batches),
            "cifar_batched_img_s": bench_batched(cifar, n_batches),
            "cifar_kornia_img_s": bench_kornia(cifar, n_batches),
        }
    result["per_sample_img_s"] = bench_per_sample(fashion, n_batches)
    result["ratio"] = result["batched_img_s"] / result["per_sample_img_s"]
    result.update(
        data=data,
        batch_size=BATCH,
        batches=n_batches,
        rounds=ROUNDS,
        threads=THREADS,
        torch=torch.__version__,
        policy=SSL_POLICY,
        machine=describe("benchmarks.augment"),
    )
    return result


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("Fashion-MNIST 28x28x1", "BatchAugment", result["batched_img_s"]),
        ("Fashion-MNIST 28x28x1", "kornia.augmentation", result["kornia_img_s"]),
        ("Fashion-MNIST 28x28x1", "torchvision v2 per-sample", result["per_sample_img_s"]),
        ("CIFAR-shaped 32x32x3", "BatchAugment", result["cifar_batched_img_s"]),
        ("CIFAR-shaped 32x32x3", "kornia.augmentation", result["cifar_kornia_img_s"]),
    ]
    print(
        f"data: {result['data']}, batch {BATCH}, best of {ROUNDS} rounds of "
        f"{result['batches']} batches, {THREADS} threads / 2 DataLoader workers"
    )
    print(f"{'images':<24}{'method':<28}{'images/s':>12}")
    for shape, method, value in rows:
        print(f"{shape:<24}{method:<28}{value:>12,.0f}")
    print(f"ratio BatchAugment / per-sample: {result['ratio']:.1f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=20, help="timed batches per round and method"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument("--params", type=Path, default=PARAMS, help="params file (ssl policy)")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    result = run(args.batches, args.params)
    print_table(result)
    save_result(args.json, result)


if __name__ == "__main__":
    main()
