"""predict: the most probable classes of image files under a fine-tuned classifier.

``python -m pipeline predict --model models/finetune/<init>-<mode>-<fraction> IMAGE...`` is not
a stage: nothing downstream depends on it. Each image goes through exactly the conversion the
imagefolder dataset applies to training images (``formats.load_image``: shorter side resized,
centre crop, transparency on black, then grey or RGB) and the normalization of training
(``(x / 255 - mean) / std`` with the classifier's own mean and std), so a prediction here is
what evaluation would compute for the same pixels. torch is imported only when predicting, so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.checks import is_int
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # torch and numpy are imported only to predict, so --help answers at once
    import numpy as np
    import torch
    from torch import nn

#: Images converted and classified at once; bounds memory for long file lists.
BATCH_SIZE = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``predict``."""
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="PATH",
        help="a classifier folder written by the finetune stage "
        "(models/finetune/<init>-<mode>-<fraction>)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="which seed's weights to use (default: the first one saved)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=3,
        metavar="K",
        help="how many of the most probable classes to print per image (default: 3)",
    )
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")


def predict(
    model_folder: Path, images: list[Path], top_k: int = 3, seed: int | None = None
) -> list[dict[str, Any]]:
    """The ``top_k`` most probable classes of each image, most probable first.

    Returns ``[{"image": str(path), "top": [{"class": name, "probability": p}, ...]}, ...]`` in
    the order of ``images``; ``top`` has ``min(top_k, number of classes)`` entries. A folder that
    is not a classifier raises MissingInputError, an unreadable image DataError (both name the
    path), and ``top_k < 1`` PipelineError. The whole list is checked before any prediction, so
    a bad file late in the list fails fast instead of after minutes of work.
    """
    if not is_int(top_k) or top_k < 1:
        raise PipelineError(f"--top-k = {top_k!r} is not allowed: must be an integer >= 1")

    import numpy as np
    import torch

    from pipeline.data.formats import load_image
    from pipeline.models import classifier

    module, description = classifier.load(Path(model_folder), seed)
    classes: list[str] = list(description["classes"])
    size, channels = int(description["image_size"]), int(description["in_channels"])
    k = min(top_k, len(classes))

    paths = [Path(p) for p in images]
    pixels = [load_image(path, size, channels) for path in paths]  # DataError names the file
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH_SIZE):
            batch = np.stack(pixels[start : start + BATCH_SIZE])  # N x H x W x C uint8
            probabilities = probabilities_of(module, description, batch)
            values, indices = probabilities.topk(k, dim=1)  # sorted, largest first
            for offset, (row_p, row_i) in enumerate(zip(values, indices, strict=True)):
                results.append(
                    {
                        "image": str(paths[start + offset]),
                        "top": [
                            {"class": classes[int(i)], "probability": float(p)}
                            for p, i in zip(row_p, row_i, strict=True)
                        ],
                    }
                )
    return results


def probabilities_of(
    module: nn.Module, description: dict[str, Any], pixels: np.ndarray
) -> torch.Tensor:
    """Class probabilities (N x K float tensor) of N x H x W x C uint8 pixels: the training
    normalization, ``(x / 255 - mean) / std`` with the classifier's own statistics, then the
    classifier. ``predict`` and the MLflow model (pipeline/serving.py) both go through here."""
    import torch

    mean = torch.tensor(description["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(description["std"], dtype=torch.float32).view(1, -1, 1, 1)
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).to(torch.float32)
    # Same operations in the same order as BatchAugment.apply, so float32 results agree.
    x = x.div_(255.0).sub_(mean).div_(std).contiguous()
    with torch.inference_mode():
        return module(x).float()


def format_predictions(results: list[dict[str, Any]]) -> str:
    """The printed form: the image path, then one ``  <class>  <probability>`` line per class.

    Not padded into columns, so a script can take the probability as the last word of a line
    even when a class name contains spaces.
    """
    lines: list[str] = []
    for result in results:
        lines.append(result["image"])
        lines.extend(f"  {t['class']}  {t['probability']:.4f}" for t in result["top"])
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Predict and print; errors meant for the user propagate as PipelineError for the CLI."""
    results = predict(args.model, list(args.images), top_k=args.top_k, seed=args.seed)
    print(format_predictions(results))
    return 0
