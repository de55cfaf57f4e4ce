"""SimCLR through lightly beside ours: images/s and validation kNN accuracy per second of training.

    python -m benchmarks.peer [--seconds 240] [--every 30] [--json OUT]

Why: "ours is fast" means little without a peer trained on the same problem. lightly is the
well-kept SimCLR library a user would reach for instead: its ``NTXentLoss``, its
``SimCLRTransform`` (per-image PIL transforms) and a PyTorch DataLoader with worker processes.
Both sides get the same backbone and projection head (params.yaml's ``model`` and
``pretrain.simclr``), the same optimizer and learning rate (constant: a wall-clock budget has no
epoch count to decay over), the same batch size, the same training images, the same precision
(``trainer.precision``) and the same wall-clock budget. lightly's transform is set to our policy
as far as its options go (crop scale, colour-jitter strength and probability, blur, flip), and
its loss to our temperature, so what differs is the engine, not the recipe.

Every ``--every`` seconds of training (the clock stops while it is measured), each side's kNN
accuracy on a held-out validation set is measured the way the pretraining monitor does: a bank
of 10,000 training images, the best k and temperature of params.yaml's monitor grid.

Data: Debian's Fashion-MNIST training file; 6,000 seeded random images are the validation set,
the other 54,000 train. The test file is never opened.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import describe, save_result

PARAMS = Path("params.yaml")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
BANK = 10_000
WORKERS = 2


def load_data(seed: int = 0) -> dict[str, Any]:
    from pipeline.data.formats import read_idx_pair

    images, labels = read_idx_pair(
        FASHION_MNIST / "train-images-idx3-ubyte.gz", FASHION_MNIST / "train-labels-idx1-ubyte.gz"
    )
    order = np.random.default_rng(seed).permutation(len(images))
    val, train = order[:6000], order[6000:]
    pixels = images[train].astype(np.float64) / 255.0
    return {
        "train": torch.from_numpy(images[train]).permute(0, 3, 1, 2).contiguous(),
        "train_labels": torch.from_numpy(labels[train].astype(np.int64)),
        "val": torch.from_numpy(images[val]).permute(0, 3, 1, 2).contiguous(),
        "val_labels": torch.from_numpy(labels[val].astype(np.int64)),
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
    }


def _recipe(params: Path) -> dict[str, Any]:
    from pipeline.augment import resolve_policy
    from pipeline.config import load
    from pipeline.stages.pretrain import backbone_fields
    from pipeline.training import precision

    config = load(params)
    pre = config.pretrain
    return {
        "backbone": backbone_fields(config),
        "policy": resolve_policy(config.augment.policies[pre.policy_for("simclr")]),
        "simclr": {k: v for k, v in pre.options["simclr"].items() if k != "policy"},
        "optimizer": config.raw["pretrain"]["optimizer"],
        "batch_size": pre.batch_size,
        "monitor": pre.monitor,
        "bf16": precision(config.trainer.precision) == "bf16-mixed",
    }


def _module(recipe: dict[str, Any], data: dict[str, Any]) -> Any:
    """Our PretrainModule: the encoder and projection head both sides train."""
    from pipeline.models.pretrain import PretrainModule

    return PretrainModule(
        method="simclr",
        backbone=recipe["backbone"],
        in_channels=1,
        image_size=28,
        num_classes=10,
        policy=recipe["policy"],
        mean=[data["mean"]],
        std=[data["std"]],
        options=recipe["simclr"],
        optimizer=recipe["optimizer"],
        epochs=1,
        warmup_epochs=0,
        steps_per_epoch=1,
        seed=0,
        monitor=recipe["monitor"],
    )


def _optimizer(recipe: dict[str, Any], parameters: Any) -> torch.optim.Optimizer:
    from pipeline.models.optim import build_optimizer

    opt = recipe["optimizer"]
    return build_optimizer(
        [{"params": list(parameters)}],
        opt["name"],
        opt["lr"],
        opt["weight_decay"],
        opt["momentum"],
        opt["nesterov"],
    )


def _fresh_model(recipe: dict[str, Any], data: dict[str, Any]) -> tuple[Any, torch.optim.Optimizer]:
    """Both sides' start: the same seeded module, and the optimizer over all of it but the
    linear probe (the monitor's probe is not part of what either side trains)."""
    torch.manual_seed(0)
    module = _module(recipe, data)
    parameters = [p for n, p in module.named_parameters() if not n.startswith("probe")]
    return module, _optimizer(recipe, parameters)


def knn_validation(module: Any, data: dict[str, Any], monitor: dict[str, Any]) -> float:
    """The pretraining monitor's number: kNN on a 10,000-image bank, best k and temperature."""
    from pipeline.models.knn import best_knn

    module.eval()
    bank = module.encode(data["train"][:BANK])
    queries = module.encode(data["val"])
    module.train()
    return best_knn(
        bank,
        data["train_labels"][:BANK],
        queries,
        data["val_labels"],
        monitor["knn_ks"],
        monitor["knn_temperatures"],
        10,
    )[0]


def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def _timed(
    step: Any, batch: int, module: Any, data: dict, recipe: dict, seconds: float, every: float
) -> dict[str, Any]:
    """Call ``step()`` until ``seconds`` of training; kNN every ``every`` seconds (untimed)."""
    curve = [{"seconds": 0.0, "images": 0, "knn": knn_validation(module, data, recipe["monitor"])}]
    trained, images, next_check = 0.0, 0, every
    while trained < seconds:
        start = time.perf_counter()
        step()
        trained += time.perf_counter() - start
        images += batch
        if trained >= next_check or trained >= seconds:
            curve.append(
                {
                    "seconds": round(trained, 1),
                    "images": images,
                    "knn": knn_validation(module, data, recipe["monitor"]),
                }
            )
            next_check += every
    return {"images_per_s": images / trained, "curve": curve}


def run_ours(
    recipe: dict[str, Any], data: dict[str, Any], seconds: float, every: float
) -> dict[str, Any]:
    """The pipeline's path: uint8 data in memory, index batches, BatchAugment views."""
    module, optimizer = _fresh_model(recipe, data)
    generator = torch.Generator().manual_seed(0)
    batch = recipe["batch_size"]
    n = len(data["train"])

    def step() -> None:
        index = torch.randint(0, n, (batch,), generator=generator)
        with _autocast(recipe["bf16"]):
            loss = module.objective(data["train"][index], generator)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, batch, module, data, recipe, seconds, every)


class _PILDataset(torch.utils.data.Dataset):
    """Fashion-MNIST as PIL images, two lightly views per item (what lightly's examples do)."""

    def __init__(self, images: torch.Tensor, transform: Any) -> None:
        self.images = images[:, 0].numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index], mode="L"))


def lightly_transform(recipe: dict[str, Any], data: dict[str, Any]) -> Any:
    """lightly's SimCLRTransform, set to our policy as far as its options reach."""
    from lightly.transforms import SimCLRTransform

    policy = recipe["policy"]
    crop = policy.get("random_resized_crop", {"scale": (1.0, 1.0)})
    jitter = policy.get("color_jitter", {})
    blur = policy.get("gaussian_blur", {})
    return SimCLRTransform(
        input_size=28,
        min_scale=float(crop["scale"][0]),
        cj_prob=float(jitter.get("p", 0.0)),
        cj_strength=1.0,
        cj_bright=float(jitter.get("brightness", 0.0)),
        cj_contrast=float(jitter.get("contrast", 0.0)),
        cj_sat=0.0,
        cj_hue=0.0,
        random_gray_scale=0.0,
        gaussian_blur=float(blur.get("p", 0.0)),
        sigmas=tuple(float(s) for s in blur.get("sigma", (0.1, 2.0))),
        hf_prob=float(policy.get("hflip", {}).get("p", 0.0)),
        normalize={"mean": [data["mean"]], "std": [data["std"]]},
    )


def run_lightly(
    recipe: dict[str, Any], data: dict[str, Any], seconds: float, every: float
) -> dict[str, Any]:
    """lightly's loss and transform, a DataLoader with worker processes, our network."""
    from lightly.loss import NTXentLoss

    module, optimizer = _fresh_model(recipe, data)
    criterion = NTXentLoss(temperature=recipe["simclr"]["temperature"])
    batch = recipe["batch_size"]
    loader = torch.utils.data.DataLoader(
        _PILDataset(data["train"], lightly_transform(recipe, data)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=WORKERS,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            first, second = next(batches)
        except StopIteration:
            batches = iter(loader)
            first, second = next(batches)
        views = torch.cat([first, second]).contiguous(memory_format=torch.channels_last)
        with _autocast(recipe["bf16"]):
            z1, z2 = module.head(module.backbone(views)).float().chunk(2)
        loss = criterion(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, batch, module, data, recipe, seconds, every)


def time_to_reach(curve: list[dict[str, Any]], accuracy: float) -> float | None:
    """Seconds of training after which a curve first reached ``accuracy`` (None: never)."""
    return next((p["seconds"] for p in curve if p["knn"] >= accuracy), None)


def run(params: Path = PARAMS, seconds: float = 240.0, every: float = 30.0) -> dict[str, Any]:
    torch.set_num_threads(2)
    recipe = _recipe(params)
    data = load_data()
    lightly_result = run_lightly(recipe, data, seconds, every)
    ours = run_ours(recipe, data, seconds, every)
    target = lightly_result["curve"][-1]["knn"]
    reached = time_to_reach(ours["curve"], target)
    return {
        "seconds": seconds,
        "every": every,
        "batch_size": recipe["batch_size"],
        "backbone": recipe["backbone"],
        "precision": "bf16-mixed" if recipe["bf16"] else "32-true",
        "ours": ours,
        "lightly": lightly_result,
        "lightly_final_knn": target,
        "ours_seconds_to_lightly_final": reached,
        "time_ratio": None if reached is None else reached / lightly_result["curve"][-1]["seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--params", type=Path, default=PARAMS)
    parser.add_argument("--seconds", type=float, default=240.0, help="training budget per side")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between kNN checks")
    args = parser.parse_args(argv)
    result = {"machine": describe("benchmarks.peer"), **run(args.params, args.seconds, args.every)}
    save_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
